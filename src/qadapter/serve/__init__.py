"""An OpenAI-compatible HTTP server for the customized policy (the only package importing fastapi and uvicorn):
:mod:`~qadapter.serve.schema` (what a client may send), :mod:`~qadapter.serve.scheduler` (the worker
that decodes), :mod:`~qadapter.serve.metrics` (``/metrics``) and :mod:`~qadapter.serve.app` (the app,
its limits and access checks)."""

from .app import MAX_CHARS_PER_TOKEN, check_bind, context_window, create_app, model_ids, serve, server_config
from ..decode import StopMatcher
from .scheduler import Scheduler
from .schema import APIError, ChatBody, CompletionBody

__all__ = [
    "MAX_CHARS_PER_TOKEN", "APIError", "ChatBody", "CompletionBody", "Scheduler", "StopMatcher",
    "check_bind", "context_window", "create_app", "model_ids", "serve", "server_config",
]
