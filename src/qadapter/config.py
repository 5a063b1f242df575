"""Configuration: one dataclass for training a Q-Adapter, one for decoding with it, one for the server's limits.

Every field carries its help text (the single source for the CLI and the docs), its valid
range, and its paper symbol where it has one (arXiv 2407.03856). ``__post_init__`` rejects
bad values naming the field. Only the standard library is imported.

Settings come from the command line and from adapter folders, which are untrusted: a number
must be a finite int or float in its range (never a bool: JSON ``true`` is not 1.0), a name
list a list of plain names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

Check = Callable[[Any], "str | None"]  # None for a valid value, else what the value must be

MAX_SCALE = 1e4  # α₀, α̃, α_LoRA: far above any useful value, low enough that float32 scores stay finite
MAX_EPOCHS = 1e4
MAX_LORA_RANK = 65536  # the base's hidden size bounds it further when the adapter is built
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # a plain module name or dotted path, never a pattern
MAX_MODULE_NAMES = 1024
ALL_LINEAR = "all-linear"  # PEFT resolves it to every linear layer but the output head


def is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"  # 1e4 as 10000, 2**32 - 1 in full


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False, integer: bool = False) -> Check:
    """A finite number (an integer if ``integer``) in [low, high], either end open or absent."""
    bounds = [f"{'>' if low_open else '>='} {_show(low)}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {_show(high)}"] if high is not None else []
    kind = "an integer" if integer else "a number"

    def check(value: Any) -> str | None:
        if not is_number(value) or (integer and not isinstance(value, int)):
            return kind
        finite = integer or math.isfinite(value)
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        if finite and above and below:
            return None
        return " and ".join(bounds if integer or high is not None else ["finite", *bounds])

    return check


SCALE = number(0, MAX_SCALE, low_open=True)  # α₀, α̃, α_LoRA: finite and > 0


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else " or ".join(map(repr, choices))


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def module_names(value: Any) -> str | None:
    """A non-empty list of plain module names: PEFT matches list entries by name, never as regexes."""
    ok = (
        isinstance(value, list)
        and 0 < len(value) <= MAX_MODULE_NAMES
        and all(isinstance(name, str) and len(name) <= 256 and MODULE_NAME.fullmatch(name) for name in value)
    )
    return None if ok else f"a list of 1 to {MAX_MODULE_NAMES} module names (letters, digits, '_' and '.')"


def lora_targets(value: Any) -> str | None:
    """Module names, or PEFT's 'all-linear' (the only string PEFT does not run as a regex)."""
    expected = None if value == ALL_LINEAR else module_names(value)
    return expected and f"{expected} or {ALL_LINEAR!r}"


MAX_LAYERS = 4096  # far above any decoder's depth; the base's own depth bounds the indices when the adapter is built


def adapt_layers_value(value: Any) -> str | None:
    """None (every layer), a count K >= 1 (the top K layers), or a list of distinct layer indices."""
    if value is None or (is_number(value) and isinstance(value, int) and 1 <= value <= MAX_LAYERS):
        return None
    ok = (
        isinstance(value, list)
        and 0 < len(value) <= MAX_LAYERS
        and all(is_number(i) and isinstance(i, int) and 0 <= i < MAX_LAYERS for i in value)
        and len(set(value)) == len(value)
    )
    return None if ok else f"a layer count in [1, {MAX_LAYERS}] or a list of distinct layer indices in [0, {MAX_LAYERS})"


def parse_adapt_layers(text: str) -> int | list[int] | None:
    """The CLI's ``--adapt-layers``: ``"8"`` → 8 (the top 8 layers), ``"20,21,22"`` → those indices (one index
    alone: ``"5,"``), ``"all"`` → None (every layer)."""
    text = text.strip()
    if text.lower() in ("", "all", "none"):
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts if part]
    except ValueError:
        raise ConfigError(f"adapt_layers: expected a layer count (8) or comma-separated layer indices (20,21,22), got {text!r}") from None
    return numbers if "," in text else numbers[0]


def resolve_layers(adapt_layers: int | list[int] | None, num_layers: int) -> list[int] | None:
    """The layer indices ``adapt_layers`` names in a decoder of ``num_layers`` layers, ascending (None: every
    layer); ConfigError where it asks for layers the decoder does not have."""
    if adapt_layers is None:
        return None
    if isinstance(adapt_layers, int):
        if adapt_layers > num_layers:
            raise ConfigError(f"adapt_layers must be at most the base model's {num_layers} layers, got {adapt_layers}")
        return list(range(num_layers - adapt_layers, num_layers))
    beyond = [i for i in adapt_layers if i >= num_layers]
    if beyond:
        raise ConfigError(f"adapt_layers must name layers below {num_layers} (the base model's depth), got {beyond[0]}")
    return sorted(adapt_layers)


def parse_targets(values: list[str]) -> list[str] | str:
    """The CLI's ``--target-modules`` (comma-separated, repeatable) → a list of names, or 'all-linear' alone."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def problem(name: str, value: Any, check: Check) -> str | None:
    """'NAME must be EXPECTED, got VALUE' if ``check`` refuses ``value``, else None."""
    expected = check(value)
    return None if expected is None else f"{name} must be {expected}, got {reprlib.repr(value)}"


def check_fields(settings: Any) -> None:
    """Raise ConfigError naming the first field of a settings dataclass whose check refuses its value."""
    for f in dataclasses.fields(settings):
        check = f.metadata.get("check")
        message = check and problem(f.name, getattr(settings, f.name), check)
        if message:
            raise ConfigError(message)


def _help(text: str, check: Check | None = None) -> dict[str, Any]:
    return {"help": text, "check": check}


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
            "initialisation, the default); 'raw': Q = adapted logits, as the reference code does.",
            one_of("residual", "raw"),
        ),
    )
    alpha_0: float = field(
        default=1.0,
        metadata=_help(
            "α₀ = λ·α₁ > 0, weight of the base log-policy in the customized policy "
            "(Q + α₀ log π₁)/α̃. Larger keeps the model closer to the base. Can be changed at "
            "generation time without retraining. The reference code uses 0.01 with q_form='raw'.",
            SCALE,
        ),
    )
    alpha_tilde: float = field(
        default=1.0, metadata=_help("α̃ in (0, 1e4], temperature of the customized policy and of the soft value V.", SCALE)
    )
    gamma: float = field(default=1.0, metadata=_help("γ in [0, 1], discount of the Bellman residual r₂ = Q − γV'.", number(0, 1)))
    beta: float = field(
        default=0.1, metadata=_help("β >= 0, weight of the χ² penalty mean(r₂²) that keeps token rewards small.", number(0))
    )
    value_state: str = field(
        default="next",
        metadata=_help(
            "Which state's value the token reward subtracts. 'next': r₂ = Q(s_t,a_t) − γV(s_{t+1}) (the "
            "paper's Bellman residual); 'current': r₂ = Q(s_t,a_t) − γV(s_t) (the reference code).",
            one_of("next", "current"),
        ),
    )
    length_normalize: bool = field(
        default=False,
        metadata=_help(
            "Divide each response's summed reward by its own number of tokens before the Bradley–Terry "
            "comparison (the reference code divides by the padded batch length instead).",
            boolean,
        ),
    )
    # --- LoRA -----------------------------------------------------------------------------------
    lora_r: int = field(default=8, metadata=_help("LoRA rank r >= 1, at most the base model's hidden size.", number(1, MAX_LORA_RANK, integer=True)))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling α_LoRA in (0, 1e4] (the update is scaled by α_LoRA/r).", SCALE))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input during training, in [0, 1).", number(0, 1, high_open=True)))
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            **_help(
                f"Module names that get LoRA, comma-separated (default: attention query and value projections), or {ALL_LINEAR!r} "
                "(every linear layer but the output head, as PEFT resolves it).",
                lora_targets,
            ),
            "collect": parse_targets,  # the CLI's values → the field
            "metavar": "NAME,...",
        },
    )
    adapt_layers: int | list[int] | None = field(
        default=None,
        metadata={
            **_help(
                "Which decoder layers get LoRA: a count K (the top K layers, e.g. 8), comma-separated layer indices "
                "(e.g. 20,21,22), or none for every layer. Layers below the lowest adapted one compute the same for the "
                "base and the adapter, so they run once, shared by both passes, in training, scoring and decoding. "
                "Saved as PEFT's layers_to_transform.",
                adapt_layers_value,
            ),
            "parse": parse_adapt_layers,  # the CLI's text → the field
            "metavar": "K|I,J,...",
        },
    )
    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = field(default=1e-3, metadata=_help("Peak AdamW learning rate, in (0, 1].", number(0, 1, low_open=True)))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay >= 0.", number(0)))
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of steps of linear warm-up, in [0, 1).", number(0, 1, high_open=True)))
    lr_scheduler: str = field(default="cosine", metadata=_help("'cosine', 'linear' or 'constant' after warm-up.", one_of("cosine", "linear", "constant")))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm > 0.", number(0, low_open=True)))
    batch_size: int = field(default=4, metadata=_help("Preference pairs per optimizer step (global, all processes).", number(1, integer=True)))
    micro_batch_size: int = field(
        default=4, metadata=_help("Pairs per forward pass; batch_size / (micro_batch_size × processes) steps are accumulated.", number(1, integer=True))
    )
    epochs: float = field(default=1.0, metadata=_help("Passes over the training pairs (fractions allowed), in (0, 1e4].", number(0, MAX_EPOCHS, low_open=True)))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps (overrides epochs).", optional(number(1, integer=True))))
    seed: int = field(default=0, metadata=_help("Seed for LoRA initialisation, data order and dropout, in [0, 2³²).", number(0, 2**32 - 1, integer=True)))
    # --- sequences ------------------------------------------------------------------------------
    max_length: int = field(
        default=192,
        metadata=_help("Maximum tokens of prompt + response; longer pairs are truncated (raise it for long conversations; cost grows with it).", number(2, integer=True)),
    )
    max_prompt_length: int = field(
        default=128,
        metadata=_help(
            "Prompt tokens that survive truncation. Over-long pairs lose prompt tokens from the left first "
            "(down to this many), then response tokens from the right.",
            number(1, integer=True),
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)  # each field alone first, so the checks below compare numbers
        if self.micro_batch_size > self.batch_size or self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length must be < max_length={self.max_length}, got {self.max_prompt_length}")

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


# The fields of the method itself; the LoRA, optimisation and sequence fields are shared with its peers
# (sft, dpo and replay train with TRL on the same settings).
METHOD_FIELDS = ("q_form", "alpha_0", "alpha_tilde", "gamma", "beta", "value_state", "length_normalize")

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


@dataclass(frozen=True)
class Dial:
    """The dial of the customized policy (Σ_i w_i·Q_i + α₀ log π₁)/α̃ (arXiv 2407.03856 Eq. 7, summed
    over the loaded adapters): what a call may change without retraining.

    A blank (None) means the adapters' own setting; :meth:`resolve` fills the blanks, and is the one
    place that rule lives. Values are checked here, once, when a dial is made.
    """

    alpha_0: float | None = field(default=None, metadata=_help("α₀ > 0 (the forgetting dial); None: the active adapter's.", optional(SCALE)))
    alpha_tilde: float | None = field(default=None, metadata=_help("α̃ > 0; None: the active adapter's.", optional(SCALE)))
    weights: Mapping[str, float] | None = field(
        default=None, metadata=_help("w_i of each adapter's Q by name; adapters not named keep weight 1, weight 0 leaves one out.")
    )

    def __post_init__(self) -> None:
        check_fields(self)
        for adapter, weight in (self.weights or {}).items():
            if not is_number(weight) or not math.isfinite(weight):
                raise ConfigError(f"weights: the weight of adapter {adapter!r} must be a finite number, got {weight!r}")

    def resolve(self, adapters: Mapping[str, "QAdapterConfig"]) -> "Dial":
        """This dial with every blank filled from ``adapters`` (name → settings, the active one first): α₀ and
        α̃ from the active adapter, weight 1 for every adapter not named. A weight for an adapter that is not
        loaded is refused. Values are kept as given (no conversion), so a resolved dial compares and
        serializes like the settings it came from."""
        weights = self.weights or {}
        unknown = sorted(set(weights) - set(adapters))
        if unknown:
            raise ConfigError(f"weights: no adapter named {', '.join(unknown)} (loaded: {', '.join(adapters)})")
        own = next(iter(adapters.values()))
        return Dial(
            own.alpha_0 if self.alpha_0 is None else self.alpha_0,
            own.alpha_tilde if self.alpha_tilde is None else self.alpha_tilde,
            {name: float(weights.get(name, 1.0)) for name in adapters},
        )


@dataclass
class DecodeConfig:
    """How the customized policy generates text; its :attr:`dial` says which policy."""

    max_new_tokens: int = field(default=128, metadata=_help("Tokens to generate at most, >= 1.", number(1, integer=True)))
    min_new_tokens: int = field(default=0, metadata=_help("Tokens to generate before EOS may end a row, in [0, max_new_tokens].", number(0, integer=True)))
    temperature: float = field(default=0.0, metadata=_help("Sampling temperature >= 0 on top of α̃; 0 is greedy.", number(0)))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1]; 1 keeps every token.", number(0, 1, low_open=True)))
    # The dial's three fields (checked by Dial) stay flat here: the CLI makes one option per field.
    alpha_0: float | None = field(default=None, metadata=_help("Override α₀ at generation time (the forgetting dial)."))
    alpha_tilde: float | None = field(default=None, metadata=_help("Override α̃ at generation time."))
    seed: int | None = field(default=None, metadata=_help("Seed for sampling; None draws fresh randomness.", optional(number(0, 2**64 - 1, integer=True))))
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
        check_fields(self)
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        self.dial  # its checks: α₀ and α̃ finite and > 0, every weight finite

    @property
    def dial(self) -> Dial:
        return Dial(self.alpha_0, self.alpha_tilde, self.weights)


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of `qadapter serve` (see SECURITY.md, "Server")."""

    max_request_bytes: int = field(
        default=4 * 2**20,
        metadata=_help("Largest request body in bytes; larger ones are answered 413 before they are read.", number(1, integer=True)),
    )
    read_timeout: float = field(
        default=30.0,
        metadata=_help(
            "Seconds a client has to send a request's headers, and again its body; then the connection is closed (408 for a body).",
            number(0, low_open=True),
        ),
    )
    max_stop_chars: int = field(default=256, metadata=_help("Longest `stop` string in characters; longer ones are answered 400.", number(1, integer=True)))

    def __post_init__(self) -> None:
        check_fields(self)


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
