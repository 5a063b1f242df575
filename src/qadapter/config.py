"""Configuration: one dataclass for training a Q-Adapter, one for decoding with it, one for the server's limits.

Every field carries its help text (the single source for the CLI and the docs), its valid
range, and its paper symbol where it has one (arXiv 2407.03856). ``__post_init__`` rejects
bad values naming the field. Only the standard library is imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class QAdapterConfig:
    """Everything that defines a Q-Adapter training run.

    Method (arXiv 2407.03856 §4):
    """

    # --- method -------------------------------------------------------------------------------
    q_form: str = field(
        default="residual",
        metadata=_help(
            "What the adapter's output means. 'residual': Q = adapted logits − base logits (Q = 0 at "
            "initialisation, the default); 'raw': Q = adapted logits, as the reference code does."
        ),
    )
    alpha_0: float = field(
        default=1.0,
        metadata=_help(
            "α₀ = λ·α₁ > 0, weight of the base log-policy in the customized policy "
            "(Q + α₀ log π₁)/α̃. Larger keeps the model closer to the base. Can be changed at "
            "generation time without retraining. The reference code uses 0.01 with q_form='raw'."
        ),
    )
    alpha_tilde: float = field(
        default=1.0, metadata=_help("α̃ > 0, temperature of the customized policy and of the soft value V.")
    )
    gamma: float = field(default=1.0, metadata=_help("γ in [0, 1], discount of the Bellman residual r₂ = Q − γV'."))
    beta: float = field(
        default=0.1, metadata=_help("β >= 0, weight of the χ² penalty mean(r₂²) that keeps token rewards small.")
    )
    value_state: str = field(
        default="next",
        metadata=_help(
            "Which state's value the token reward subtracts. 'next': r₂ = Q(s_t,a_t) − γV(s_{t+1}) (the "
            "paper's Bellman residual); 'current': r₂ = Q(s_t,a_t) − γV(s_t) (the reference code)."
        ),
    )
    length_normalize: bool = field(
        default=False,
        metadata=_help(
            "Divide each response's summed reward by its own number of tokens before the Bradley–Terry "
            "comparison (the reference code divides by the padded batch length instead)."
        ),
    )
    # --- LoRA -----------------------------------------------------------------------------------
    lora_r: int = field(default=8, metadata=_help("LoRA rank r >= 1."))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling α_LoRA > 0 (the update is scaled by α_LoRA/r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input during training, in [0, 1)."))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_help("Module names that get LoRA (default: attention query and value projections)."),
    )
    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = field(default=1e-3, metadata=_help("Peak AdamW learning rate > 0."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay >= 0."))
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of steps of linear warm-up, in [0, 1)."))
    lr_scheduler: str = field(default="cosine", metadata=_help("'cosine', 'linear' or 'constant' after warm-up."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm > 0."))
    batch_size: int = field(default=4, metadata=_help("Preference pairs per optimizer step (global, all processes)."))
    micro_batch_size: int = field(
        default=4, metadata=_help("Pairs per forward pass; batch_size / (micro_batch_size × processes) steps are accumulated.")
    )
    epochs: float = field(default=1.0, metadata=_help("Passes over the training pairs (fractions allowed), > 0."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps (overrides epochs)."))
    seed: int = field(default=0, metadata=_help("Seed for LoRA initialisation, data order and dropout."))
    # --- sequences ------------------------------------------------------------------------------
    max_length: int = field(
        default=192,
        metadata=_help("Maximum tokens of prompt + response; longer pairs are truncated (raise it for long conversations; cost grows with it)."),
    )
    max_prompt_length: int = field(
        default=128,
        metadata=_help(
            "Prompt tokens that survive truncation. Over-long pairs lose prompt tokens from the left first "
            "(down to this many), then response tokens from the right."
        ),
    )

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("q_form", self.q_form in ("residual", "raw"), "'residual' or 'raw'"),
            ("alpha_0", self.alpha_0 > 0, "> 0"),
            ("alpha_tilde", self.alpha_tilde > 0, "> 0"),
            ("gamma", 0.0 <= self.gamma <= 1.0, "in [0, 1]"),
            ("beta", self.beta >= 0, ">= 0"),
            ("value_state", self.value_state in ("next", "current"), "'next' or 'current'"),
            ("lora_r", self.lora_r >= 1, ">= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)"),
            ("target_modules", len(self.target_modules) > 0, "a non-empty list of module names"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("lr_scheduler", self.lr_scheduler in ("cosine", "linear", "constant"), "'cosine', 'linear' or 'constant'"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batch_size", 1 <= self.micro_batch_size <= self.batch_size, f"in [1, batch_size={self.batch_size}]"),
            ("epochs", self.epochs > 0, "> 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or None"),
            ("max_length", self.max_length >= 2, ">= 2"),
            ("max_prompt_length", 1 <= self.max_prompt_length < self.max_length, f"in [1, max_length={self.max_length})"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "QAdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "QAdapterConfig":
        return dataclasses.replace(self, **changes)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no '+', ',', '=', '.': they separate names in model ids and CLI values


def parse_weights(text: str) -> dict[str, float]:
    """``"a=1,b=0.5"`` → ``{"a": 1.0, "b": 0.5}`` (the CLI's ``--weights``)."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight: float | None = float(value)
        except ValueError:
            weight = None
        if not sep or weight is None or not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"weights: expected NAME=NUMBER pairs separated by commas, got {item!r}")
        weights[name] = weight
    return weights


@dataclass
class DecodeConfig:
    """How the customized policy generates text."""

    max_new_tokens: int = field(default=128, metadata=_help("Tokens to generate at most, >= 1."))
    min_new_tokens: int = field(default=0, metadata=_help("Tokens to generate before EOS may end a row, in [0, max_new_tokens]."))
    temperature: float = field(default=0.0, metadata=_help("Sampling temperature >= 0 on top of α̃; 0 is greedy."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1]; 1 keeps every token."))
    alpha_0: float | None = field(default=None, metadata=_help("Override α₀ at generation time (the forgetting dial)."))
    alpha_tilde: float | None = field(default=None, metadata=_help("Override α̃ at generation time."))
    seed: int | None = field(default=None, metadata=_help("Seed for sampling; None draws fresh randomness."))
    weights: dict[str, float] | None = field(
        default=None,
        metadata={
            **_help(
                "Weight w_i of each loaded adapter's Q in (Σ_i w_i·Q_i + α₀ log π₁)/α̃, e.g. a=1,b=0.5; "
                "adapters not named keep weight 1, weight 0 leaves one out."
            ),
            "parse": parse_weights,  # the CLI's --weights text → dict
            "metavar": "NAME=W,...",
        },
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # `not >=`: NaN fails every comparison
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("alpha_0", "alpha_tilde"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        for adapter, weight in (self.weights or {}).items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ConfigError(f"weights: the weight of adapter {adapter!r} must be a finite number, got {weight!r}")


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of `qadapter serve` (see SECURITY.md, "Server")."""

    max_request_bytes: int = field(
        default=4 * 2**20, metadata=_help("Largest request body in bytes; larger ones are answered 413 before they are read.")
    )
    read_timeout: float = field(
        default=30.0,
        metadata=_help("Seconds a client has to send a request's headers, and again its body; then the connection is closed (408 for a body)."),
    )
    max_stop_chars: int = field(default=256, metadata=_help("Longest `stop` string in characters; longer ones are answered 400."))

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.read_timeout > 0 and math.isfinite(self.read_timeout)):
            raise ConfigError(f"read_timeout must be a finite number of seconds > 0, got {self.read_timeout}")


def field_help(config_cls: type, name: str) -> str:
    """The help text of a config field: the one source for CLI help and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls)}[name]


def read_json(path: str, what: str) -> dict[str, Any]:
    """Read a JSON object, naming the file in any error."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a JSON object, got {type(data).__name__}")
    return data
