"""Sharing adapters through the Hugging Face hub (``huggingface_hub``): push a folder, load one by hub id.

An adapter folder is small (LoRA weights and three JSON files; no base weights), so it travels as
is: ``push_to_hub`` uploads exactly the files an adapter folder holds, and wherever qadapter takes an
adapter folder it also takes ``owner/name`` (or ``owner/name@revision``) that is not a local path,
fetched with ``snapshot_download`` (those files only) and then read and checked like any folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ModelError

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "qadapter_config.json", "README.md", "baseline.json"]
HUB_ADAPTER = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def hub_reference(value: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``value`` names a hub adapter rather than a local path: the
    ``owner/name[@revision]`` form, no such path here, and no local folder ``owner`` either (a
    missing ``runs/x`` is a local path that is not there, not a hub id)."""
    text = str(value)
    match = HUB_ADAPTER.fullmatch(text)
    if match is None or Path(text).exists() or Path(text.split("/")[0]).is_dir():
        return None
    return match["repo"], match["revision"]


def adapter_folder(value: str | Path) -> Path:
    """A local adapter folder for ``value``: the path itself, or the hub adapter it names, downloaded
    into the hub cache (offline: taken from it)."""
    reference = hub_reference(value)
    if reference is None:
        return Path(value)
    from huggingface_hub import snapshot_download

    repo_id, revision = reference
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ADAPTER_FILES))
    except Exception as exc:  # not found, no network, offline mode, auth: huggingface_hub raises many kinds
        raise ModelError(f"{value}: no such adapter folder here, and fetching it from the hub failed ({type(exc).__name__}: {exc})") from None


def push_to_hub(adapter_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str | None = None) -> Any:
    """Upload an adapter folder (checked first: only a valid Q-Adapter folder is pushed, and only its
    adapter files) to the hub model repository ``repo_id``, created if need be. Returns the commit."""
    from huggingface_hub import HfApi

    from .checkpoint import read_adapter

    files = read_adapter(adapter_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(files.folder),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=ADAPTER_FILES,
        commit_message=commit_message or f"Q-Adapter {files.config.q_form} Q on {files.saved.name}",
    )
