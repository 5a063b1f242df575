"""Exporting a Q-Adapter's customized policy as one plain model: a merged Hugging Face folder (for
transformers, vLLM, TGI, …) or a GGUF file (for llama.cpp, Ollama).

The customized policy's logits are linear in the two passes' logits, a (adapted) and b (base), up to
a constant per state that the softmax removes:

    residual Q (Q = a − b):  (Q + α₀·log π₁)/α̃ = u·a + v·b,  u = 1/α̃,  v = (α₀ − 1)/α̃
    raw Q      (Q = a):      (Q + α₀·log π₁)/α̃ = u·a + v·b,  u = 1/α̃,  v = α₀/α̃

**Exact** where v = 0 (residual Q at α₀ = 1, any α̃): the policy is the adapted model with its logits
scaled by u, so the LoRA merged into the base (PEFT's ``merge_and_unload``), with the output head
scaled by u = 1/α̃ (untouched at α̃ = 1), *is* the policy, up to float rounding.

**Approximate** elsewhere. With logits L(h) = W·h linear in the final hidden state,
u·L(h_a) + v·L(h_b) = (u + v)·L(h_b + s·(h_a − h_b)), s = u/(u + v). The final hidden state of the
model whose LoRA delta is scaled by s is h_b + s·(h_a − h_b) only to first order in the delta, so
merging the LoRA scaled by s and scaling the output head by u + v approximates the policy. (Residual
Q at α₀ = α̃ gives u + v = 1 and s = 1/α₀: weight interpolation.) Such an export is refused unless
asked for; every export measures the mean per-token KL(customized policy ‖ exported model) on fixed
texts, prints it and records it in the export.

A GGUF is written offline only where the base itself came from a GGUF of a plain Llama-layout
architecture: that file serves as the template (metadata, tokenizer, tensor names), and the merged
tensors are written in its layout, q/k rows permuted as llama.cpp's ``convert_hf_to_gguf.py`` does
(transformers' GGUF loader undoes it). Any other base: export the merged folder and convert it with
llama.cpp.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, objective
from .atomic import atomic_dir
from .checkpoint import BaseIdentity, is_gguf_base, read_adapter, read_adapter_meta
from .config import Dial
from .decode import encode_prompts
from .errors import ConfigError
from .model import QAdapterModel, gguf_file_of, load_adapter, position_ids, recorded_base
from .run_folder import refuse_dangerous

EXPORT_INFO = "qadapter_export.json"  # in a merged folder: what was exported, how exact, the measured KL
GGUF_ARCHITECTURES = ("llama",)  # tensors that need only renaming and llama.cpp's q/k permutation
GGUF_TYPES = ("f16", "f32", "q8_0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The fixed texts the KL is measured on: (user turn, assistant turn).
PROBES = (
    ("What is the capital of France?", "The capital of France is Paris, on the Seine."),
    ("Explain photosynthesis in one sentence.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Write a short greeting for a colleague.", "Good morning! I hope your week is going well."),
    ("How many legs does a spider have?", "A spider has eight legs."),
)


# ---------------------------------------------------------------------------------------------
# The math: pure functions


@dataclass(frozen=True)
class MergePlan:
    """How one model stands in for the policy: the LoRA delta scaled by ``lora_scale`` (s), the output
    logits by ``head_scale`` (u + v); ``exact`` where the base term cancels (v = 0)."""

    lora_scale: float
    head_scale: float
    exact: bool


def policy_coefficients(q_form: str, alpha_0: float, alpha_tilde: float) -> tuple[float, float]:
    """(u, v) with customized logits = u·adapted + v·base logits, up to a constant per state."""
    if q_form == "residual":
        return 1 / alpha_tilde, (alpha_0 - 1) / alpha_tilde
    if q_form == "raw":
        return 1 / alpha_tilde, alpha_0 / alpha_tilde
    raise ValueError(f"q_form must be 'residual' or 'raw', got {q_form!r}")


def merge_plan(q_form: str, alpha_0: float, alpha_tilde: float) -> MergePlan:
    """The single model closest to the policy at (α₀, α̃): exact at v = 0, first-order otherwise (α₀, α̃ > 0
    make u + v > 0 in both forms)."""
    u, v = policy_coefficients(q_form, alpha_0, alpha_tilde)
    return MergePlan(lora_scale=u / (u + v), head_scale=u + v, exact=v == 0)


def mean_kl(target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the unmasked positions of KL(softmax(target) ‖ softmax(logits)), nats, in float64 (rounding
    would otherwise show as KL of ±1e-8). (b, T, V) ×2, (b, T)."""
    target, other = F.log_softmax(target_logits.double(), -1), F.log_softmax(logits.double(), -1)
    kl = (target.exp() * (target - other)).sum(-1).clamp(min=0)  # (b, T); ≥ 0 but for the last rounding
    return float(kl[mask.bool().to(kl.device)].mean())


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows in llama.cpp's order (``convert_hf_to_gguf.py``'s ``permute``): each head's two rotary halves interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`llama_permute` (what transformers' GGUF loader applies)."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# The policy, the merged model and the measurement


@dataclass
class ExportResult:
    path: Path
    format: str  # "merged" or "gguf"
    q_form: str
    alpha_0: float
    alpha_tilde: float
    plan: MergePlan
    kl: float  # mean per-token KL(customized policy ‖ export) on PROBES, nats
    n_tokens: int
    precision: str  # the exported weights' dtype (merged) or GGUF type

    def record(self, identity: BaseIdentity) -> dict[str, Any]:
        return {
            "qadapter_version": __version__,
            "format": self.format,
            "q_form": self.q_form,
            "alpha_0": self.alpha_0,
            "alpha_tilde": self.alpha_tilde,
            **asdict(self.plan),
            "kl_mean_per_token": self.kl,
            "kl_tokens": self.n_tokens,
            "kl_texts": len(PROBES),
            "precision": self.precision,
            "base": identity.to_dict(),
        }

    def summary(self) -> str:
        kind = "exact" if self.plan.exact else "APPROXIMATE"
        return (
            f"{self.path}: {kind} export of the customized policy ({self.q_form} Q, α₀ = {self.alpha_0:g}, α̃ = {self.alpha_tilde:g}; "
            f"LoRA delta ×{self.plan.lora_scale:.6g}, logits ×{self.plan.head_scale:.6g}, {self.precision}); "
            f"mean per-token KL(customized policy ‖ export) = {self.kl:.3g} nats over {self.n_tokens} tokens of {len(PROBES)} fixed texts"
        )


def probe_batch(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed texts as left-padded (ids, mask), (b, T): chats where the tokenizer has a template."""
    if getattr(tokenizer, "chat_template", None):
        return encode_prompts(tokenizer, [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PROBES])
    return encode_prompts(tokenizer, [f"{q}\n{a}" for q, a in PROBES], chat=False)


@torch.no_grad()
def model_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A plain causal LM's logits, (b, T) → (b, T, V) float32, positions skipping padding as qadapter's passes do."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits.float()


@torch.no_grad()
def policy_logits(qmodel: QAdapterModel, ids: torch.Tensor, mask: torch.Tensor, alpha_0: float, alpha_tilde: float) -> torch.Tensor:
    """The true customized policy's logits (two passes), (b, T) → (b, T, V) float32."""
    q, base_logprobs = qmodel.q_and_base_logprobs(ids.to(qmodel.device), mask.to(qmodel.device))
    return objective.combined_logits(q, base_logprobs, alpha_0, alpha_tilde)


def merge(qmodel: QAdapterModel, plan: MergePlan) -> Any:
    """The plain model of ``plan``: LoRA delta ×s merged into the base weights, logits ×(u + v).
    Consumes ``qmodel`` (PEFT merges in place)."""
    from peft.tuners.lora import LoraLayer

    inner = qmodel.peft_model.get_base_model()
    if any(isinstance(m, LoraLayer) for m in (inner.get_output_embeddings(), inner.get_input_embeddings())):
        untie_head(inner)  # merging into a shared weight would change both layers
    for module in qmodel.peft_model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(plan.lora_scale)  # PEFT: the active adapter's α/r × s (a no-op at s = 1)
    model = qmodel.peft_model.merge_and_unload()
    if plan.head_scale != 1:
        untie_head(model)
        head = model.get_output_embeddings()
        head.weight.data.mul_(plan.head_scale)
        if getattr(head, "bias", None) is not None:
            head.bias.data.mul_(plan.head_scale)
    return model


def untie_head(model: Any) -> None:
    """Give the output head (or the base layer of its LoRA) its own copy of a weight it shares with the
    input embeddings, so changing one leaves the other alone."""
    head = model.get_output_embeddings()
    layer = getattr(head, "base_layer", head)
    if layer.weight.data_ptr() == getattr(model.get_input_embeddings(), "base_layer", model.get_input_embeddings()).weight.data_ptr():
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


@dataclass
class _Prepared:
    qmodel: QAdapterModel
    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor  # the true policy's logits on the probes, (b, T, V)


def plan_for(adapter: str | Path, alpha_0: float | None, alpha_tilde: float | None, approximate: bool) -> tuple[MergePlan, Dial, str]:
    """The plan at the adapter's dial (blanks: its own α₀, α̃), refused where it is approximate and not asked for.
    Reads only the adapter's settings."""
    config, _, _ = read_adapter_meta(adapter)
    dial = Dial(alpha_0, alpha_tilde).resolve({"adapter": config})
    plan = merge_plan(config.q_form, dial.alpha_0, dial.alpha_tilde)  # type: ignore[arg-type]
    if not plan.exact and not approximate:
        raise ConfigError(
            f"{config.q_form} Q at α₀ = {dial.alpha_0:g}, α̃ = {dial.alpha_tilde:g}: no single model is this policy (a merge is exact only "
            "for residual Q at α₀ = 1); pass --approximate (approximate=True) to export a first-order approximation, its measured KL recorded"
        )
    return plan, dial, config.q_form


def checked_head(qmodel: QAdapterModel, plan: MergePlan, approximate: bool) -> MergePlan:
    """``plan``, no longer exact where it scales the logits through a head whose logits are not W·h
    (soft-capping, a bias, a scale: see ``QAdapterModel.hidden_path``), then refused unless ``approximate``."""
    if not plan.exact or plan.head_scale == 1 or qmodel.hidden_path:
        return plan
    if not approximate:
        raise ConfigError(
            "this model's logits are not a plain linear map of its last hidden state, so scaling them by 1/α̃ through the "
            "output head is not exact: pass --approximate (approximate=True), or export at α̃ = 1"
        )
    return MergePlan(plan.lora_scale, plan.head_scale, exact=False)


def _prepare(adapter: str | Path, dial: Dial, model: str | None, allow_base_mismatch: bool) -> _Prepared:
    """The adapter on its base in float32, the probe texts, and the true policy's logits on them."""
    qmodel = load_adapter(adapter, model=model, allow_base_mismatch=allow_base_mismatch, dtype=torch.float32)
    ids, mask = probe_batch(qmodel.tokenizer)
    target = policy_logits(qmodel, ids, mask, dial.alpha_0, dial.alpha_tilde)  # type: ignore[arg-type]
    return _Prepared(qmodel, ids, mask, target)


# ---------------------------------------------------------------------------------------------
# Outputs: never replace what qadapter did not write


def check_output(output: Path, overwrite: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse an existing ``output`` without ``overwrite``; with it, replace only an export of the same
    kind (``ours``), never the root, the home folder, the working folder or one above it."""
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"{output} exists: pass --overwrite to replace it, or choose another --output")
    refuse_dangerous(output)
    if not ours(output):
        raise ConfigError(f"--output {output}: not {what} qadapter wrote; --overwrite only replaces those: choose another --output")


def is_merged_export(path: Path) -> bool:
    return path.is_dir() and (path / EXPORT_INFO).is_file()


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


# ---------------------------------------------------------------------------------------------
# Merged Hugging Face folder


def export_merged(
    adapter: str | Path,
    output: str | Path,
    *,
    alpha_0: float | None = None,
    alpha_tilde: float | None = None,
    approximate: bool = False,
    dtype: str = "float32",
    model: str | None = None,
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write the policy at (α₀, α̃) (default: the adapter's) as a plain transformers model folder, with
    its tokenizer, a model card and ``qadapter_export.json``. Exact for residual Q at α₀ = 1; elsewhere
    refused unless ``approximate``. The KL is measured on the model as written (``dtype``)."""
    output = Path(output)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_output(output, overwrite, is_merged_export, "a merged export")
    plan, dial, q_form = plan_for(adapter, alpha_0, alpha_tilde, approximate)
    prepared = _prepare(adapter, dial, model, allow_base_mismatch)
    plan = checked_head(prepared.qmodel, plan, approximate)
    identity, tokenizer = prepared.qmodel.identity, prepared.qmodel.tokenizer
    merged = merge(prepared.qmodel, plan).to(DTYPES[dtype])
    kl = mean_kl(prepared.target, model_logits(merged, prepared.ids, prepared.mask), prepared.mask)
    result = ExportResult(output, "merged", q_form, dial.alpha_0, dial.alpha_tilde, plan, kl, int(prepared.mask.sum()), dtype)  # type: ignore[arg-type]
    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(result.record(identity), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(export_card(result, identity), encoding="utf-8")
    return result


def export_card(result: ExportResult, identity: BaseIdentity) -> str:
    """The merged folder's README.md: what it is, how exact, the measured KL, how to use it."""
    hub = not is_gguf_base(identity) and not Path(identity.name).is_absolute()
    what = "exactly" if result.plan.exact else "a first-order APPROXIMATION of"
    return "\n".join([
        "---",
        "library_name: transformers",
        *([f"base_model: {identity.name}"] if hub else []),
        "tags:",
        "- qadapter",
        "- merged",
        "---",
        "",
        "# Merged Q-Adapter policy",
        "",
        f"This model is {what} the customized policy π̃ ∝ exp((Q + α₀·log π₁)/α̃) of a Q-Adapter ({result.q_form} Q) at "
        f"α₀ = {result.alpha_0:g}, α̃ = {result.alpha_tilde:g}, written by qadapter {__version__}: the LoRA delta scaled by "
        f"{result.plan.lora_scale:.6g} and merged into the base, the logits scaled by {result.plan.head_scale:.6g}. "
        "(A merge is exact only for residual Q at α₀ = 1; the dial itself, and composing adapters, need qadapter.)",
        "",
        f"Measured: mean per-token KL(customized policy ‖ this model) = {result.kl:.3g} nats over {result.n_tokens} tokens "
        f"of {len(PROBES)} fixed texts, weights in {result.precision}.",
        "",
        f"Base model: `{identity.file or identity.name}`" + (f", sha256 `{identity.sha256}`" if identity.sha256 else "")
        + (f", revision `{identity.revision}`" if identity.revision and not identity.sha256 else "") + ".",
        "",
        "Use it as any causal LM: `AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")`, `vllm serve THIS_FOLDER`; "
        "for llama.cpp / Ollama convert it with llama.cpp's `convert_hf_to_gguf.py THIS_FOLDER`.",
        "",
    ])


# ---------------------------------------------------------------------------------------------
# GGUF, on the base's own GGUF as the template


def base_gguf(adapter: str | Path, model: str | None) -> Path:
    """The GGUF file the adapter's base (or ``model``) was loaded from; a base from anywhere else is refused."""
    name = model or recorded_base(read_adapter(adapter).saved)
    path = gguf_file_of(name)
    if path is None:
        raise ConfigError(
            f"the base {name} is not a GGUF file, so there is no GGUF to take the layout from: export --to merged, then convert "
            "that folder with llama.cpp (python convert_hf_to_gguf.py MERGED_FOLDER --outfile model.gguf)"
        )
    return path


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_type(name: str) -> Any:
    import gguf

    if name not in GGUF_TYPES:
        raise ConfigError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {name!r}")
    return gguf.GGMLQuantizationType[name.upper()]


def gguf_tensors(model: Any, reader: Any, qtype: Any) -> dict[str, tuple[np.ndarray, Any]]:
    """The merged model's tensors in the template's layout, {GGUF name: (data as written, its type)}, in
    the template's order (an untied output head last); and the model's weights replaced in place by what
    a reader of the file gets back, so it can be measured. Refused where the names or shapes do not match."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    written: dict[str, tuple[np.ndarray, Any]] = {}
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{hf_name}: no GGUF name for this tensor; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
        n_head = next((n for key, n in heads.items() if f".{key}." in hf_name), None)
        array = tensor.detach().float().cpu().numpy()
        array = llama_permute(array, n_head) if n_head else array
        kind = qtype if array.ndim > 1 else gguf.GGMLQuantizationType.F32  # norms and biases stay F32, as llama.cpp wants
        if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide
        data = gguf.quants.quantize(array, kind)
        back = gguf.quants.dequantize(data, kind).reshape(array.shape)
        tensor.data.copy_(torch.from_numpy(llama_unpermute(back, n_head) if n_head else back))
        written[name] = (data, kind)
    _check_layout(written, reader, tied)
    order = [t.name for t in reader.tensors] + [n for n in written if n not in {t.name for t in reader.tensors}]
    return {name: written[name] for name in order}


def _check_layout(written: dict[str, tuple[np.ndarray, Any]], reader: Any, tied: bool) -> None:
    template = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    expected = set(template) | ({"output.weight"} if not tied else set())
    if set(written) != expected:
        extra, missing = sorted(set(written) - expected), sorted(expected - set(written))
        raise ConfigError(
            f"the merged model's tensors do not match the base GGUF's (extra: {extra[:3]}, missing: {missing[:3]}); "
            "export --to merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    import gguf

    for name, shape in template.items():
        data, kind = written[name]
        logical = gguf.quant_shape_from_byte_shape(data.shape, kind) if data.dtype == np.uint8 else data.shape
        if tuple(logical) != shape:
            raise ConfigError(f"{name}: shape {tuple(logical)} where the base GGUF has {shape}")


def write_gguf(path: Path, reader: Any, tensors: dict[str, tuple[np.ndarray, Any]], qtype: Any, extra: dict[str, Any]) -> None:
    """A GGUF at ``path``: the template's metadata (tokenizer, chat template, hyper-parameters) but its
    file type, plus ``extra`` (``qadapter.*`` keys), and ``tensors``."""
    import gguf

    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(path, architecture)
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype.name]
    writer.add_file_type(file_type)
    for key, value in extra.items():
        kind = gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.STRING
        writer.add_key_value(key, value, kind)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    adapter: str | Path,
    output: str | Path,
    *,
    alpha_0: float | None = None,
    alpha_tilde: float | None = None,
    approximate: bool = False,
    gguf_type_name: str = "f16",
    model: str | None = None,
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write the policy at (α₀, α̃) as one GGUF file in the layout of the base's own GGUF, tensors in
    ``gguf_type_name`` (f16, f32 or q8_0; 1-D tensors F32). Exactness as :func:`export_merged`; the KL is
    measured on the weights a reader of the file gets back, and stored in its ``qadapter.*`` metadata."""
    import gguf

    output = Path(output)
    qtype = gguf_type(gguf_type_name)
    check_output(output, overwrite, is_gguf_file, "a GGUF file")
    plan, dial, q_form = plan_for(adapter, alpha_0, alpha_tilde, approximate)
    template = base_gguf(adapter, model)
    reader = gguf.GGUFReader(template)
    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if architecture not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{template.name}: GGUF architecture {architecture!r}; qadapter writes GGUF for {', '.join(GGUF_ARCHITECTURES)} only: "
            "export --to merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    prepared = _prepare(adapter, dial, model, allow_base_mismatch)
    plan = checked_head(prepared.qmodel, plan, approximate)
    identity = prepared.qmodel.identity
    merged = merge(prepared.qmodel, plan)
    tensors = gguf_tensors(merged, reader, qtype)  # merged now holds what the file reads back as
    kl = mean_kl(prepared.target, model_logits(merged, prepared.ids, prepared.mask), prepared.mask)
    result = ExportResult(output, "gguf", q_form, dial.alpha_0, dial.alpha_tilde, plan, kl, int(prepared.mask.sum()), gguf_type_name)  # type: ignore[arg-type]
    extra = {
        "qadapter.version": __version__,
        "qadapter.q_form": q_form,
        "qadapter.alpha_0": float(dial.alpha_0),  # type: ignore[arg-type]
        "qadapter.alpha_tilde": float(dial.alpha_tilde),  # type: ignore[arg-type]
        "qadapter.exact": plan.exact,
        "qadapter.kl_mean_per_token": kl,
        "qadapter.base_sha256": identity.sha256 or identity.gguf_sha256 or "",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    try:
        write_gguf(Path(tmp), reader, tensors, qtype, extra)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result

