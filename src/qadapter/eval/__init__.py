"""Evaluation: how well a Q-Adapter learned the new preference, and what it kept.

The building blocks, importable from here (each loads its module, and torch, on first use):

* preferences: :func:`evaluate_preferences` / :func:`evaluate_preferences_at` (totals per dial),
  :func:`preference_pairs` (one :class:`PairResult` per pair, with its prompt, origin and category)
  and :func:`by_category`;
* retention: :class:`ChoiceItem` (one context, several continuations), :class:`ContextChoiceItem`
  (several contexts, one continuation: Winogrande-style), :class:`GenerationItem`,
  :func:`load_benchmark`, :class:`PolicySpec`, :func:`choice_logliks`, :func:`choice_accuracy`,
  :func:`generation_correct`, :func:`kl_to_base` and :func:`paired_difference`.

The whole evaluation (cached, with a report) is ``qadapter eval``, :mod:`qadapter.eval.runner`.
"""

from __future__ import annotations

from typing import Any

# Lazy re-exports, as the top-level package: importing qadapter.eval needs no torch.
_EXPORTS = {
    "PreferenceEval": "qadapter.preference_eval",
    "PairResult": "qadapter.preference_eval",
    "evaluate_preferences": "qadapter.preference_eval",
    "evaluate_preferences_at": "qadapter.preference_eval",
    "preference_pairs": "qadapter.preference_eval",
    "by_category": "qadapter.preference_eval",
    "preference_accuracy": "qadapter.preference_eval",
    "ChoiceItem": "qadapter.eval.benchmarks",
    "ContextChoiceItem": "qadapter.eval.benchmarks",
    "GenerationItem": "qadapter.eval.benchmarks",
    "load_benchmark": "qadapter.eval.benchmarks",
    "PolicySpec": "qadapter.eval.retention",
    "choice_logliks": "qadapter.eval.retention",
    "choice_accuracy": "qadapter.eval.retention",
    "generation_correct": "qadapter.eval.retention",
    "kl_to_base": "qadapter.eval.retention",
    "paired_difference": "qadapter.eval.retention",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qadapter.eval' has no attribute {name!r}")
