"""The schema of an adapter folder's ``adapter_config.json``, checked before PEFT builds anything from it.

Adapter folders are untrusted input, and PEFT trusts its config: it matches a string
``target_modules`` as a regular expression against every module name (``"(.*)*.*X"`` backtracks
for minutes), allocates whatever rank ``r`` asks for, and honours options that change the base
model itself (initialisations that rewrite base weights, whole modules to save, DoRA, …).
A Q-Adapter is plain LoRA: the fields qadapter writes are checked by type and range, bounded by
the loaded base model's dimensions; every other field must be left unset. PEFT is then given the
checked settings, never the file.
"""

from __future__ import annotations

import dataclasses
import reprlib
from pathlib import Path
from typing import Any

import torch

from .config import MAX_LORA_RANK, MAX_SCALE, Check, boolean, lora_targets, number, one_of, optional, problem
from .errors import ConfigError, ModelError


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and len(value) <= 4096 else "a string of at most 4096 characters"


def target_modules(value: Any) -> str | None:
    """A list of plain module names, or 'all-linear'; any other string PEFT would run as a regex."""
    return None if lora_targets(value) is None else "a list of module names or 'all-linear' (never a regular expression)"


def layer_indices(value: Any) -> str | None:
    """One layer index or a list of them; the base's layer count bounds them (see check_against_base)."""
    indices = value if isinstance(value, list) else [value]
    ok = 0 < len(indices) <= 4096 and all(number(0, integer=True)(i) is None for i in indices)
    return None if ok else "a layer index or a list of layer indices"


FIELDS: dict[str, Check] = {
    "peft_type": one_of("LORA"),
    "task_type": one_of("CAUSAL_LM"),
    "r": number(1, MAX_LORA_RANK, integer=True),
    "lora_alpha": number(0, MAX_SCALE, low_open=True),
    "lora_dropout": number(0, 1, high_open=True),
    "target_modules": target_modules,
    "layers_to_transform": optional(layer_indices),
    "bias": one_of("none"),  # other values add bias tensors to the base layers
    "use_rslora": boolean,
    "fan_in_fan_out": boolean,  # GPT-2-style Conv1D layers store their weight transposed
    "init_lora_weights": boolean,  # the named ones (pissa, olora, loftq, eva, corda, …) rewrite base weights at load
    "inference_mode": boolean,
    "base_model_name_or_path": optional(text),
    "revision": optional(text),
    "peft_version": optional(text),
    "megatron_core": text,  # read only with megatron_config, which must stay unset
    "qalora_group_size": number(1, integer=True),  # read only with use_qalora, which must stay unset
}
REQUIRED = ("peft_type", "task_type", "r", "lora_alpha", "target_modules")


def _unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def check_peft_config(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data`` (the parsed ``adapter_config.json`` at ``path``) if it is plain LoRA within range;
    else ConfigError naming the file and the field."""
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{path}: field '{missing[0]}' is missing")
    for key, value in data.items():
        check = FIELDS.get(key)
        if check is None and not _unset(value):
            raise ConfigError(f"{path}: field '{key}' is not supported in a Q-Adapter (it must be unset, got {reprlib.repr(value)})")
        message = problem(f"field '{key}'", value, check) if check else None
        if message:
            raise ConfigError(f"{path}: {message}")
    return data


def base_dimensions(model: Any) -> tuple[int, int | None]:
    """(hidden size, number of layers) from the base model's (text) config: the bounds of a LoRA rank
    and of layer indices, known before any adapter is built."""
    config = model.config.get_text_config()
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not isinstance(hidden, int) or hidden < 1:
        raise ModelError(f"the base model's config ({type(config).__name__}) has no hidden_size to bound the LoRA rank by")
    return hidden, layers if isinstance(layers, int) else None


def check_rank(r: int, model: Any, where: str) -> None:
    """Refuse a LoRA rank above the base's hidden size: a higher rank adds nothing and its memory is unbounded."""
    hidden, _ = base_dimensions(model)
    if r > hidden:
        raise ConfigError(f"{where} must be <= the base model's hidden size ({hidden}), got {r}")


def check_against_base(settings: dict[str, Any], path: Path, model: Any) -> None:
    """The checked settings against the loaded base: rank, layer indices and module names."""
    check_rank(settings["r"], model, f"{path}: field 'r'")
    layers = settings.get("layers_to_transform")
    if layers is not None:
        _, count = base_dimensions(model)
        highest = max(layers) if isinstance(layers, list) else layers
        if count is None:
            raise ConfigError(f"{path}: field 'layers_to_transform' cannot be checked: the base config has no num_hidden_layers")
        if highest >= count:
            raise ConfigError(f"{path}: field 'layers_to_transform' must name layers below {count}, got {highest}")
    unknown = unknown_targets(settings["target_modules"], model)
    if unknown:
        raise ConfigError(f"{path}: field 'target_modules' names no module of the base model: {unknown[0]!r}")


def unknown_targets(targets: list[str] | str, model: Any) -> list[str]:
    """The entries of a target list that name no module of ``model`` by PEFT's rule for a list (the
    whole name or its dotted tail); none for 'all-linear', which PEFT resolves on the model itself."""
    if not isinstance(targets, list):
        return []
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def lora_shapes(module: torch.nn.Module, r: int) -> dict[str, tuple[int, ...]] | None:
    """The tensors PEFT saves for LoRA of rank ``r`` on ``module``, by name suffix, with their shapes;
    None for a module type qadapter does not load LoRA for."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Embedding):
        return {"lora_embedding_A": (r, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, r)}
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out = module.in_features, module.out_features
    elif isinstance(module, Conv1D):  # weight stored as (in, out)
        fan_in, fan_out = module.weight.shape
    else:
        return None
    return {"lora_A.weight": (r, fan_in), "lora_B.weight": (fan_out, r)}


def _expected_shape(name: str, model: Any, modules: dict[str, torch.nn.Module], r: int) -> tuple[int, ...] | None:
    """The shape of the saved tensor ``name`` (PEFT's prefix removed), or None if plain LoRA never saves it."""
    if name.endswith(".base_layer.weight"):  # PEFT saves a targeted embedding layer whole; never any other base weight
        module = modules.get(name.removesuffix(".base_layer.weight"))
        embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
        return tuple(module.weight.shape) if module is not None and any(module is e for e in embeddings) else None
    owner, sep, leaf = name.rpartition(".lora_")
    module = modules.get(owner) if sep else None
    return (lora_shapes(module, r) or {}).get("lora_" + leaf) if module is not None else None


def check_tensor_shapes(shapes: dict[str, list[int]], r: int, path: Path, model: Any) -> None:
    """Every tensor of the safetensors file (names and shapes from its header) must be a LoRA factor of
    rank ``r`` on a module of the base: PEFT would load any other base weight it finds there."""
    modules = dict(model.named_modules())
    prefix = "base_model.model."
    for key, shape in shapes.items():
        expected = _expected_shape(key.removeprefix(prefix), model, modules, r) if key.startswith(prefix) else None
        if expected is None:
            raise ModelError(f"{path}: tensor {key!r} is not a LoRA weight of a module of the base model")
        if tuple(shape) != expected:
            raise ModelError(f"{path}: tensor {key!r} has shape {list(shape)}, expected {list(expected)} for rank r={r}")


def lora_config_from(settings: dict[str, Any], inference_mode: bool) -> Any:
    """A PEFT LoraConfig from checked settings (fields this PEFT version does not know are unset: dropped)."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{**{k: v for k, v in settings.items() if k in known}, "inference_mode": inference_mode})
