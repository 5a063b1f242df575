"""Adapter and checkpoint folders: written atomically, read back and validated, each side mirroring the other.

An adapter folder is PEFT's standard layout (``adapter_model.safetensors``,
``adapter_config.json``) plus ``qadapter_config.json``, which holds the method settings and the
identity of the base model. Base weights are never written. A training checkpoint is an adapter
folder plus ``trainer_state.pt`` (optimizer, scheduler, progress, RNG states).

This module only reads and writes folders; :mod:`qadapter.model` builds a model from what it reads.
Every folder is written with :func:`~qadapter.atomic.atomic_dir`: a crash or interrupt leaves either
the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_dir
from .adapter_schema import check_against_base, check_peft_config, check_tensor_shapes
from .config import ADAPTER_NAME, QAdapterConfig, read_json
from .errors import ConfigError, ModelError
from .hub import adapter_folder

QADAPTER_CONFIG = "qadapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.pt"
STEP_FOLDER = re.compile(r"step-\d+")  # checkpoints/step-000004; anything else there is not ours
RESERVED_NAMES = ("base", "__base__")  # the server's model id of the base; PEFT's name for "no adapter"
GGUF_REVISION = "gguf-sha256:"  # a GGUF base's revision: its content hash, not a hub commit
SHA256 = re.compile(r"[0-9a-f]{64}")
README = "README.md"


@dataclass
class BaseIdentity:
    """What an adapter records about its base model: a portable way to find it again on any machine
    (``name``, ``revision``, ``file``, ``sha256``), and what refuses a different one at load time
    (``architecture``, ``fingerprint``, ``chat_template_sha256``).

    ``name`` is what :func:`~qadapter.model.load_base` takes again: ``"bundled"``, a hub id, or an
    absolute path (a GGUF file or a local folder, found again by ``sha256`` where the path is not
    there). ``revision``: the hub commit, or ``gguf-sha256:…`` for a GGUF. ``file``: a GGUF's file
    name. ``sha256``: a GGUF's content hash, or a local folder's weight files' (None for a hub model,
    which its commit pins). Adapters written before ``file`` and ``sha256`` existed read as None.
    """

    name: str
    revision: str | None
    architecture: dict[str, Any]
    fingerprint: list[float]
    chat_template_sha256: str | None
    file: str | None = None
    sha256: str | None = None

    @property
    def gguf_sha256(self) -> str | None:
        """The content hash of a GGUF base (older adapters record it only in ``revision``)."""
        if self.revision is not None and self.revision.startswith(GGUF_REVISION):
            return self.revision[len(GGUF_REVISION) :]
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseIdentity":
        return cls(**data)

    def mismatches(self, other: "BaseIdentity") -> list[str]:
        """Human-readable differences that make an adapter trained on ``self`` invalid on ``other``."""
        problems = [
            f"{key}: adapter expects {self.architecture[key]!r}, base has {other.architecture.get(key)!r}"
            for key in self.architecture
            if self.architecture[key] != other.architecture.get(key)
        ]
        if not problems and not torch.allclose(
            torch.tensor(self.fingerprint), torch.tensor(other.fingerprint), rtol=2e-2, atol=1e-3
        ):
            problems.append("weights differ from those the adapter was trained on")
        if self.chat_template_sha256 != other.chat_template_sha256:
            problems.append("chat template differs from the one the adapter was trained with")
        return problems


def write_adapter_files(qmodel: Any, folder: Path) -> None:
    """PEFT's adapter files, pointed at the base by its portable identity, plus qadapter_config.json
    and a model card into ``folder`` (the caller makes it atomic)."""
    qmodel.peft_model.save_pretrained(str(folder), safe_serialization=True)
    name_or_path, revision = peft_base_reference(qmodel.identity)
    peft_path = folder / ADAPTER_CONFIG
    peft = json.loads(peft_path.read_text(encoding="utf-8"))
    peft.update(base_model_name_or_path=name_or_path, revision=revision)  # PEFT wrote the machine's own path
    peft_path.write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    meta = {"qadapter_version": __version__, "config": qmodel.config.to_dict(), "base": qmodel.identity.to_dict()}
    (folder / QADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / README).write_text(adapter_card(qmodel.config, qmodel.identity), encoding="utf-8")


def is_gguf_base(identity: BaseIdentity) -> bool:
    return identity.file is not None or identity.gguf_sha256 is not None


def peft_base_reference(identity: BaseIdentity) -> tuple[str, str | None]:
    """``(base_model_name_or_path, revision)`` for PEFT's adapter_config.json. A hub model: its id and
    commit, which ``AutoPeftModelForCausalLM`` loads on any machine. A local folder: its absolute path.
    A GGUF base: its file name, for people to read; transformers cannot load a GGUF from that field
    (PEFT passes no ``gguf_file``), so PEFT users load the base with :func:`qadapter.base_model_path`."""
    if is_gguf_base(identity):
        return identity.file or identity.name, None
    return identity.name, hub_revision(identity)


def adapter_card(config: QAdapterConfig, identity: BaseIdentity) -> str:
    """The adapter folder's README.md: what it is, its base by portable identity, how to load it."""
    q = "adapted − base logits" if config.q_form == "residual" else "the adapted logits"
    name_or_path, _ = peft_base_reference(identity)
    hub = not is_gguf_base(identity) and not Path(identity.name).is_absolute()
    base_lines = [f"- {key}: `{value}`" for key, value in (("name", identity.name), ("revision", identity.revision), ("file", identity.file), ("sha256", identity.sha256)) if value]
    exact = config.q_form == "residual" and config.alpha_0 == config.alpha_tilde == 1
    exact_text = "exactly the customized policy at this adapter's dial" if exact else "not the customized policy at this adapter's dial"
    return "\n".join([
        "---",
        "library_name: peft",
        *([f"base_model: {identity.name}"] if hub else []),
        "tags:",
        "- qadapter",
        "- lora",
        "---",
        "",
        "# Q-Adapter",
        "",
        "A LoRA adapter read as a Q-function (Q-Adapter, arXiv 2407.03856), written by qadapter "
        f"{__version__}. The customized policy is π̃ ∝ exp((Q + α₀·log π₁)/α̃), Q = {q} ({config.q_form} Q), "
        f"with α₀ = {config.alpha_0:g} and α̃ = {config.alpha_tilde:g} by default (both can be changed when decoding).",
        "",
        "## Base model",
        "",
        *base_lines,
        "",
        "## Load",
        "",
        "```python",
        "from qadapter import QAdapterModel  # finds the base on any machine that has it",
        'qmodel = QAdapterModel.from_pretrained("ADAPTER")  # this folder, or its hub id',
        "```",
        "",
        f"With PEFT alone you get the adapted model ({exact_text}; `qadapter export` merges it, and says which exports are exact):",
        "",
        "```python",
        "import qadapter",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        'base = AutoModelForCausalLM.from_pretrained(qadapter.base_model_path("ADAPTER"))',
        'model = PeftModel.from_pretrained(base, "ADAPTER")',
        "```",
        "",
        f"`adapter_config.json` names the base as `{name_or_path}`"
        + (" (a GGUF: transformers cannot load it from that name, hence `base_model_path`)." if is_gguf_base(identity) else "."),
        "",
    ])


def save_adapter(qmodel: Any, adapter_dir: str | Path) -> None:
    """Write the LoRA weights (safetensors, PEFT layout) and ``qadapter_config.json``, atomically."""
    with atomic_dir(adapter_dir) as tmp:
        write_adapter_files(qmodel, tmp)


def read_adapter_meta(adapter_dir: str | Path) -> tuple[QAdapterConfig, dict[str, Any], str]:
    """(config, base identity dict, qadapter version) of an adapter folder (or hub id), validated."""
    adapter_dir = adapter_folder(adapter_dir)
    path = adapter_dir / QADAPTER_CONFIG
    if not path.is_file():
        hint = " (a plain PEFT LoRA? Q-Adapters carry qadapter_config.json)" if (adapter_dir / "adapter_config.json").is_file() else ""
        raise ModelError(f"{adapter_dir}: not a Q-Adapter folder, {QADAPTER_CONFIG} is missing{hint}")
    meta = read_json(str(path), "Q-Adapter config")
    for key in ("config", "base"):
        if not isinstance(meta.get(key), dict):
            raise ConfigError(f"{path}: field '{key}' is missing or not an object")
    try:
        config = QAdapterConfig.from_dict(meta["config"], source=str(path))
    except ConfigError as exc:  # range checks name the field but not the file
        raise ConfigError(str(exc) if str(exc).startswith(f"{path}:") else f"{path}: {exc}") from None
    return config, meta["base"], str(meta.get("qadapter_version", "unknown"))


def _saved_identity(base_meta: dict[str, Any], path: Path) -> BaseIdentity:
    """The recorded base identity, its field types checked so comparing it cannot crash."""
    try:
        saved = BaseIdentity.from_dict(base_meta)
    except TypeError as exc:
        raise ConfigError(f"{path}: malformed 'base' ({exc})") from None
    fingerprint = saved.fingerprint
    checks = {
        "name": isinstance(saved.name, str) and bool(saved.name),
        "revision": saved.revision is None or isinstance(saved.revision, str),
        "architecture": isinstance(saved.architecture, dict),
        "fingerprint": isinstance(fingerprint, list)
        and bool(fingerprint)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fingerprint),
        "chat_template_sha256": saved.chat_template_sha256 is None or isinstance(saved.chat_template_sha256, str),
        "file": saved.file is None or isinstance(saved.file, str) and "/" not in saved.file and bool(saved.file),
        "sha256": saved.sha256 is None or isinstance(saved.sha256, str) and SHA256.fullmatch(saved.sha256) is not None,
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{path}: malformed 'base' (wrong type or empty: {', '.join(bad)})")
    return saved


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header; a tampered file fails here, not deep in PEFT."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None


@dataclass
class AdapterFiles:
    """An adapter folder's contents, read and validated before any model is touched."""

    folder: Path
    config: QAdapterConfig
    saved: BaseIdentity  # recorded at training time
    peft: dict[str, Any]  # adapter_config.json, checked against the schema: what PEFT is given
    shapes: dict[str, list[int]]


def read_adapter(adapter_dir: str | Path) -> AdapterFiles:
    """Everything an adapter folder (or hub id, see :mod:`qadapter.hub`) holds, each file checked against its schema."""
    folder = adapter_folder(adapter_dir)
    config, base_meta, _ = read_adapter_meta(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{folder}: {ADAPTER_WEIGHTS} is missing (only safetensors adapters are loaded)")
    saved = _saved_identity(base_meta, folder / QADAPTER_CONFIG)
    peft = check_peft_config(read_json(str(folder / ADAPTER_CONFIG), "PEFT adapter config"), folder / ADAPTER_CONFIG)
    return AdapterFiles(folder, config, saved, peft, _tensor_shapes(folder / ADAPTER_WEIGHTS))


def check_base(files: AdapterFiles, base: Any, allow_base_mismatch: bool) -> None:
    """Refuse a base whose architecture, weights or chat template differ from the recorded one."""
    if len(files.saved.fingerprint) != len(base.identity.fingerprint):
        raise ConfigError(
            f"{files.folder / QADAPTER_CONFIG}: malformed 'base' (fingerprint has {len(files.saved.fingerprint)} values, "
            f"expected {len(base.identity.fingerprint)})"
        )
    problems = files.saved.mismatches(base.identity)
    if problems and not allow_base_mismatch:
        raise ModelError(
            f"{files.folder} was trained on a different base model ({files.saved.name}): "
            + "; ".join(problems)
            + ". Load the matching base, or pass allow_base_mismatch=True (--allow-base-mismatch) if you know why."
        )


def check_fits(files: AdapterFiles, base: Any) -> None:
    """The adapter's settings and tensor shapes against the base's modules and dimensions, before
    PEFT allocates anything."""
    check_against_base(files.peft, files.folder / ADAPTER_CONFIG, base.model)
    check_tensor_shapes(files.shapes, files.peft["r"], files.folder / ADAPTER_WEIGHTS, base.model)


def check_adapter_names(names: Collection[str]) -> None:
    """A composition's adapters need plain names, none of them reserved, and at least one."""
    if not names:
        raise ConfigError("a composition needs at least one adapter")
    bad = [name for name in names if not ADAPTER_NAME.fullmatch(name) or name in RESERVED_NAMES]
    if bad:
        raise ConfigError(
            f"adapter name(s) {', '.join(map(repr, bad))}: use letters, digits, '_' and '-' (at most 64), not {' or '.join(RESERVED_NAMES)}"
        )


def check_same_base(adapters: dict[str, AdapterFiles], allow_base_mismatch: bool) -> None:
    """Composed adapters must all have been trained on one base: their Q-functions add up only
    relative to the same policy."""
    (first_name, first), *others = adapters.items()
    for name, files in others:
        same_length = len(files.saved.fingerprint) == len(first.saved.fingerprint)
        problems = first.saved.mismatches(files.saved) if same_length else ["weights fingerprints of different lengths"]
        if problems and not allow_base_mismatch:
            raise ModelError(
                f"adapters {first_name!r} ({first.folder}) and {name!r} ({files.folder}) were trained on different base "
                f"models ({first.saved.name}, {files.saved.name}): " + "; ".join(problems) + ". Only adapters of one base compose."
            )


def hub_revision(identity: BaseIdentity) -> str | None:
    """The hub revision to load a recorded base at; None for a GGUF base (its revision is a content hash)."""
    revision = identity.revision
    return None if revision is None or revision.startswith(GGUF_REVISION) else revision


# ---------------------------------------------------------------------------------------------
# Resume state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(qmodel: Any, folder: str | Path, trainer_state: dict[str, Any]) -> None:
    """An adapter folder plus ``trainer_state.pt``: one dict of tensors, numbers, strings, lists and
    dicts (what ``weights_only`` loading accepts), read back by the same keys."""
    with atomic_dir(folder) as tmp:
        write_adapter_files(qmodel, tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)


# The layout of trainer_state.pt: its sections, and the progress fields training reads back.
_SECTIONS = ("optimizer", "scheduler", "rng", "progress")
_PROGRESS_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "history": list,
    "before": (dict, type(None)),
    "train_seconds": (int, float),
    "skipped_steps": int,
    "data_digest": str,
}


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` with ``weights_only=True``: plain data only, so a tampered file cannot
    run code on resume. A file holding anything else, or not laid out as saved, is refused naming it."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise ModelError(f"{folder}: not a training checkpoint ({TRAINER_STATE} is missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: {_unpickling_detail(exc)}; a trainer state holds only plain data") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # truncated or not a torch file
        raise ModelError(f"{path}: not a readable trainer state ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    _check_layout(state, path)
    return state


def _unpickling_detail(exc: pickle.UnpicklingError) -> str:
    """The object the file would have built (torch's own message spans many lines)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"it would call or build {found.group(1)}" if found else "it holds pickle instructions beyond plain data"


def _check_layout(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(state.get(key), dict) for key in _SECTIONS):
        raise ModelError(f"{path}: malformed trainer state (expected the sections {', '.join(_SECTIONS)})")
    progress = state["progress"]
    bad = [
        key
        for key, kind in _PROGRESS_TYPES.items()
        if not isinstance(progress.get(key), kind) or isinstance(progress.get(key), bool)
    ]
    if bad or progress["step"] < 0:
        raise ModelError(f"{path}: malformed trainer state (progress field(s) {', '.join(bad or ['step'])})")


def restore_trainer_state(state: dict[str, Any], folder: str | Path, optimizer: Any, scheduler: Any, scaler: Any = None) -> None:
    """Put the saved optimizer, scheduler, RNG and grad-scaler states back; one that does not fit this
    run (other parameters, a foreign scheduler) is refused naming the file."""
    path = Path(folder) / TRAINER_STATE
    try:
        if set(state["scheduler"]) != set(scheduler.state_dict()):  # load_state_dict would set any attribute it is given
            raise ValueError(f"scheduler keys {sorted(state['scheduler'])}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise ModelError(f"{path}: trainer state does not fit this run ({' '.join(str(exc).split())})") from None


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = Path(checkpoints_dir)
    done = [p for p in folder.glob("step-*") if STEP_FOLDER.fullmatch(p.name) and (p / TRAINER_STATE).is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
