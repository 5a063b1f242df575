"""qadapter: customize a pre-trained LLM to new preferences without forgetting (Q-Adapter,
Li et al., arXiv 2407.03856, ICLR 2025)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Lazy re-exports: `import qadapter` stays instant and `qadapter --help` needs no torch.
_EXPORTS = {
    "QAdapterConfig": "qadapter.config",
    "DecodeConfig": "qadapter.config",
    "QAdapterModel": "qadapter.model",
    "load_base": "qadapter.model",
    "base_model_path": "qadapter.model",
    "push_to_hub": "qadapter.hub",
    "export_merged": "qadapter.export",
    "export_gguf": "qadapter.export",
    "read_records": "qadapter.data",
    "split_by_prompt": "qadapter.data",
    "PreferenceRecord": "qadapter.data",
    "train": "qadapter.training",
    "generate": "qadapter.decode",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qadapter' has no attribute {name!r}")
