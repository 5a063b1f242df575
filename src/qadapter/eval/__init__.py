"""Evaluation: how well a Q-Adapter learned the new preference, and what it kept."""
