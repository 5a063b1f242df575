"""The peers Q-Adapter is compared with, trained by TRL on the same data and LoRA settings.

``sft``     TRL's ``SFTTrainer`` on the chosen response of every training pair (conversational
            prompt/completion rows, loss on the completion only). One row per pair, so a prompt with
            four pairs contributes its chosen response four times, as the reference ``sft_train.py``
            does: every method then sees the same number of rows and optimizer steps.
``dpo``     TRL's ``DPOTrainer`` on the training pairs, with a PEFT LoRA. No reference model is
            loaded: TRL computes the reference log-probabilities with the adapter disabled, i.e. with
            the frozen base π₁ itself, which is also Q-Adapter's base pass.
``replay``  DPO (``replay_base="dpo"``) or SFT (``"sft"``) on the training rows plus replay rows:
            responses the base model itself generates for general prompts (see :func:`replay_records`),
            making up ``replay_fraction`` of all rows.

Replay rows. The reference code (``make_replay_data.py``) generates a response with the base model
for each prompt and writes a copy of the record with ``chosen`` replaced by that response, keeping
its ``rejected`` one. Here the prompts come from a general distribution instead of the task's own
(default: the single-turn prompts of HH-RLHF helpful-base test, see :func:`default_replay_prompts`),
and the construction is the same:

* replay SFT row: (x, y₁) with y₁ ~ π₁(·|x). The NLL of base samples is a Monte-Carlo estimate of
  the cross-entropy H(π₁, π) on the general distribution, i.e. KL(π₁ ‖ π) up to a constant, whose
  minimiser is π = π₁ there: the row pulls the policy back to the base exactly where the task data
  says nothing. Hence sampling at temperature 1 by default; greedy decoding (the reference code's
  choice) replays π₁'s mode, a sharpened target that lowers entropy on general prompts.
* replay DPO row: (x, chosen = y₁, rejected = the reply human labellers rejected for x). DPO's
  gradient raises log π(y₁|x)/π₁(y₁|x) — the same anchor to the base's own behaviour, kept inside
  DPOTrainer's loss and its β-KL to π₁ rather than added as a second loss — against a response
  that is dispreferred for x under the general preference. The label means "keep the base's
  behaviour here", not "the base's answer is better". The alternatives are worse: two base samples
  as a pair carry an arbitrary label (one order) or cancel (both orders: no gradient at π = π₁),
  and an NLL term on y₁ would mean changing TRL's loss; this keeps the peer a stock ``DPOTrainer``
  run. Passing the training records as ``replay_prompts`` with ``temperature=0`` gives the
  reference code's own construction (its prompts, its greedy decoding).

Every trained peer is saved as a Q-Adapter folder (PEFT LoRA + ``qadapter_config.json`` with
``q_form="residual"``, α₀ = α̃ = 1, where the customized policy (Q + log π₁) = adapted logits up to a
constant is the adapted model itself) plus ``baseline.json``, so evaluation loads every method with
``QAdapterModel.from_pretrained``. This is the only module that imports TRL.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, write_json_atomic
from ..checkpoint import write_adapter_files
from ..config import DecodeConfig, QAdapterConfig
from ..data import Message, PreferenceRecord, Turns, data_file, default_data_dir, read_records
from ..errors import ConfigError, DataError

METHODS = ("sft", "dpo", "replay")
REPLAY_BASES = ("dpo", "sft")
BASELINE_FILE = "baseline.json"
DEFAULT_REPLAY_SOURCE = "hh-rlhf/helpful-base/test.jsonl.gz"  # relative to the data folder (shipped with the package)
ReplayPrompt = PreferenceRecord | str | list[Message]


# ---------------------------------------------------------------------------------------------
# Replay data


@dataclass(frozen=True)
class ReplayRecord:
    """A general prompt, the base model's response to it, and (for DPO) a dispreferred reply."""

    prompt: Turns
    response: str
    rejected: str | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def _turn(self, text: str) -> Turns:
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def sft_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self._turn(self.response)}

    def dpo_row(self) -> dict[str, Any]:
        if self.rejected is None:
            raise DataError(f"replay prompt {_short(self.prompt)} has no rejected reply: DPO replay needs preference records as prompts")
        return {"prompt": self.prompt, "chosen": self._turn(self.response), "rejected": self._turn(self.rejected)}


def _short(prompt: Turns) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return repr(text[:60] + ("…" if len(text) > 60 else ""))


def default_replay_prompts(data_dir: str | Path, exclude: Iterable[PreferenceRecord] = ()) -> list[PreferenceRecord]:
    """General prompts for replay: the single-turn records of HH-RLHF helpful-base test (698).

    Why these and not DSP queries outside the training split: with the usual split the only such
    queries are the held-out evaluation prompts (replaying them would leak evaluation prompts into
    training), and they are the task's distribution, not the original one. HH helpful-base holds
    general assistant requests, disjoint from DSP, and each comes with a reply its labellers
    rejected, which DPO replay pairs with the base's response. Prompts of ``exclude`` (the training
    and held-out records) are left out, so HH data trained on is never replayed.
    """
    path = data_file(data_dir, DEFAULT_REPLAY_SOURCE)
    excluded = {r.prompt_key for r in exclude}
    seen: set[str] = set()
    pool = []
    for record in read_records(path, skip_invalid=True).records:
        key = record.prompt_key
        if len(record.prompt) == 1 and key not in excluded and key not in seen:
            seen.add(key)
            pool.append(record)
    return pool


def _normalize(prompt: ReplayPrompt, chat: bool) -> tuple[Turns, str | None]:
    """(prompt, rejected reply or None); a string becomes a user turn for chat models."""
    if isinstance(prompt, PreferenceRecord):
        rejected = prompt.rejected if isinstance(prompt.rejected, str) else prompt.rejected[0]["content"]
        return prompt.prompt, rejected
    if isinstance(prompt, str):
        return ([{"role": "user", "content": prompt}] if chat else prompt), None
    return list(prompt), None


def _read_cache(path: Path, pool: list[tuple[Turns, str | None]]) -> list[str]:
    """Cached responses: a prefix of the pool, in pool order (nothing if the file does not match)."""
    if not path.is_file():
        return []
    responses = []
    try:
        with open(path, encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                row = json.loads(line)
                if i >= len(pool) or row["prompt"] != pool[i][0]:
                    return []
                responses.append(row["response"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return []
    return responses


def _write_cache(path: Path, pool: list[tuple[Turns, str | None]], responses: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for (prompt, rejected), response in zip(pool, responses):
                handle.write(json.dumps({"prompt": prompt, "response": response, "rejected": rejected}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replay_records(
    base: Any,
    prompts: Sequence[ReplayPrompt],
    n: int,
    max_new_tokens: int = 128,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    target_modules: list[str] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[ReplayRecord]:
    """The base model's responses to the first prompts of ``prompts``, ``n`` usable ones.

    ``base`` is a :class:`~qadapter.model.LoadedBase`; ``prompts`` are preference records (their
    prompt, and their rejected reply for DPO), strings or message lists, each distinct prompt used
    once. Responses come from :func:`qadapter.decode.generate` with the base policy, ``batch_size``
    prompts at a time, batch ``k`` sampled with seed ``seed + k`` (``temperature=0``: greedy). A
    response is usable if it is
    not empty and differs from the prompt's rejected reply. Generated responses are cached in
    ``cache_dir/replay-<key>.jsonl`` (key: base, prompts, decoding settings), a prefix of the prompt
    list rewritten atomically after every batch, so a rerun, or an interrupted run, generates only
    what is missing and a larger ``n`` extends the same list. ``target_modules``: where the
    temporary zero LoRA that decoding needs goes (default q_proj, v_proj); it is removed afterwards.
    """
    if n < 0:
        raise ConfigError(f"the number of replay records must be >= 0, got {n}")
    decode_settings = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)  # validates
    if n == 0:
        return []
    chat = bool(getattr(base.tokenizer, "chat_template", None))
    pool, seen = [], set()
    for item in prompts:  # each prompt once, with its first record's rejected reply (as the reference code)
        prompt, rejected = _normalize(item, chat)
        text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if text not in seen:
            seen.add(text)
            pool.append((prompt, rejected))
    identity = base.identity
    key_data = {
        "base": [identity.name, identity.revision, identity.fingerprint, identity.chat_template_sha256],
        "prompts": [p for p, _ in pool],
        "decode": [max_new_tokens, temperature, top_p, seed, batch_size],
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"replay-{key}.jsonl" if cache_dir is not None else None
    responses = _read_cache(cache, pool) if cache is not None else []

    def usable(i: int) -> bool:
        return bool(responses[i].strip()) and responses[i] != pool[i][1]

    count = sum(usable(i) for i in range(len(responses)))
    if count < n and len(responses) < len(pool):
        from ..decode import generate

        log(f"replay: generating base responses for {len(pool) - len(responses)} prompts at most ({len(responses)} cached)")
        with _base_policy(base, target_modules) as qmodel:
            while count < n and len(responses) < len(pool):
                start = len(responses)
                batch = [p for p, _ in pool[start : start + batch_size]]
                settings = DecodeConfig(**{**vars(decode_settings), "seed": seed + start // batch_size})
                responses.extend(generate(qmodel, batch, settings, policy="base"))  # type: ignore[arg-type]
                count += sum(usable(i) for i in range(start, len(responses)))
                if cache is not None:
                    _write_cache(cache, pool, responses)
    picked = [i for i in range(len(responses)) if usable(i)][:n]
    if len(picked) < n:
        raise DataError(
            f"only {len(picked)} usable replay responses from {len(pool)} replay prompts, {n} needed: "
            "pass more replay prompts or a smaller replay fraction"
        )
    return [ReplayRecord(pool[i][0], responses[i], pool[i][1]) for i in picked]


@contextmanager
def _base_policy(base: Any, target_modules: list[str] | None = None) -> Iterator[Any]:
    """A :class:`QAdapterModel` view of ``base`` for :func:`qadapter.decode.generate`, which runs the
    base rows with the adapter off; the temporary (zero) LoRA is removed on exit, leaving
    ``base.model`` as it was."""
    from ..model import QAdapterModel

    qmodel = QAdapterModel.create(base, QAdapterConfig(**({"target_modules": list(target_modules)} if target_modules else {})))
    try:
        yield qmodel
    finally:
        qmodel.peft_model.unload()


def replay_count(n_task: int, fraction: float) -> int:
    """Replay rows that make up ``fraction`` of n_task + replay rows."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"replay_fraction must be in (0, 1), got {fraction}")
    return round(fraction * n_task / (1.0 - fraction))


def training_rows(method: str, records: list[PreferenceRecord], replay: Sequence[ReplayRecord] = (), replay_base: str = "dpo") -> list[dict[str, Any]]:
    """TRL dataset rows: task rows in record order, then replay rows.

    SFT: ``{prompt, completion}`` with the chosen response; DPO: ``{prompt, chosen, rejected}``.
    """
    kind = replay_base if method == "replay" else method
    if kind == "sft":
        rows = [{"prompt": r.prompt, "completion": r.chosen} for r in records] + [r.sft_row() for r in replay]
    else:
        rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records] + [r.dpo_row() for r in replay]
    if len({isinstance(row["prompt"], list) for row in rows}) > 1:
        raise DataError("replay prompts must be conversations when the training data is, and plain text when it is plain text")
    return rows


# ---------------------------------------------------------------------------------------------
# Training


def train_baseline(
    method: str,
    train_records: list[PreferenceRecord],
    output_dir: str | Path,
    *,
    model: str = "bundled",
    config: QAdapterConfig | None = None,
    beta_dpo: float = 0.1,
    replay_fraction: float = 0.25,
    replay_prompts: Sequence[ReplayPrompt] | None = None,
    replay_base: str = "dpo",
    replay_max_new_tokens: int | None = None,
    replay_temperature: float = 1.0,
    held_out_records: Sequence[PreferenceRecord] = (),
    data_dir: str | Path | None = None,
    base: Any = None,
    mixed_precision: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Train the ``method`` peer with TRL and save it as ``output_dir/adapter`` (returned).

    LoRA settings, learning rate and schedule, global batch (``batch_size`` rows per optimizer step
    in micro-batches of ``micro_batch_size``), epochs / ``max_steps``, ``max_length`` and seed come
    from ``config``, so the peer matches a Q-Adapter run with the same config; its method fields
    (α, γ, β, …) are unused. ``beta_dpo``: DPO's β. Replay: ``replay_fraction`` of all rows are
    base-model responses to ``replay_prompts`` (default :func:`default_replay_prompts` from
    ``data_dir``, minus the prompts of ``train_records`` and ``held_out_records``), generated with at
    most ``replay_max_new_tokens`` (default max_length − max_prompt_length) at ``replay_temperature``
    and cached in ``output_dir``. ``base``: an already loaded base (its model gets the LoRA,
    in place); otherwise ``model`` is loaded (a GGUF is the dequantized plain folder, which TRL accepts).
    """
    from transformers import set_seed

    from ..hardware import choose_mixed_precision, default_device
    from ..model import QAdapterModel, load_base

    config = config or QAdapterConfig()
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if replay_base not in REPLAY_BASES:
        raise ConfigError(f"replay_base must be 'dpo' or 'sft', got {replay_base!r}")
    if beta_dpo <= 0:
        raise ConfigError(f"beta_dpo must be > 0, got {beta_dpo}")
    if not train_records:
        raise DataError("no training records")
    kind = replay_base if method == "replay" else method
    n_replay = replay_count(len(train_records), replay_fraction) if method == "replay" else 0
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro_per_step = config.batch_size // config.micro_batch_size
    if micro_per_step % world:
        raise ConfigError(f"batch_size / micro_batch_size = {micro_per_step} micro-batches per step cannot be shared by {world} processes")

    device = default_device()
    precision = choose_mixed_precision(device, mixed_precision)
    base = base or load_base(model, device=device)

    replay: list[ReplayRecord] = []
    replay_source = None
    if method == "replay":
        held_out = {r.prompt_key for r in held_out_records}
        if replay_prompts is None:
            root = Path(data_dir) if data_dir is not None else default_data_dir()
            replay_prompts = default_replay_prompts(root, exclude=[*train_records, *held_out_records])
            replay_source = DEFAULT_REPLAY_SOURCE  # relative: results must not carry this machine's paths
        else:
            replay_prompts = [p for p in replay_prompts if not (isinstance(p, PreferenceRecord) and p.prompt_key in held_out)]
            replay_source = f"{len(replay_prompts)} given prompts"
        replay = replay_records(
            base,
            replay_prompts,
            n_replay,
            replay_max_new_tokens or config.max_length - config.max_prompt_length,
            config.seed,
            temperature=replay_temperature,
            batch_size=max(config.micro_batch_size, 8),
            cache_dir=output,
            target_modules=config.target_modules,
            log=log,
        )
    rows = training_rows(method, train_records, replay, replay_base)
    log(f"{method}{f' ({replay_base})' if method == 'replay' else ''}: {len(train_records)} task rows + {len(replay)} replay rows; precision {precision}")

    set_seed(config.seed)  # TRL draws the LoRA initialisation before the Trainer seeds anything
    started = time.perf_counter()
    peft_model, state, train_loss, n_rows = _run_trl(kind, rows, base, config, device, precision, beta_dpo, world, output, progress)
    train_seconds = time.perf_counter() - started

    import trl

    # The customized policy at q_form="residual", α₀ = α̃ = 1 is softmax(adapted logits): the peer's own policy.
    saved_config = config.replace(q_form="residual", alpha_0=1.0, alpha_tilde=1.0)
    qmodel = QAdapterModel(peft_model, base.tokenizer, saved_config, base.identity)
    info = {
        "method": method,
        "trainer": "SFTTrainer" if kind == "sft" else "DPOTrainer",
        "replay_base": replay_base if method == "replay" else None,
        "beta_dpo": beta_dpo if kind == "dpo" else None,
        "replay_fraction": replay_fraction if method == "replay" else None,
        "n_task_rows": len(train_records),
        "n_replay_rows": len(replay),
        "n_rows_after_trl_filtering": n_rows,
        "replay_source": replay_source,
        "replay_temperature": replay_temperature if method == "replay" else None,
        "steps": state.global_step,
        "train_loss": train_loss,
        "train_seconds": round(train_seconds, 1),
        "precision": precision,
        "trl_version": trl.__version__,
        "log_history": state.log_history,
        "config": config.to_dict(),
        **(run_info or {}),
    }
    adapter_dir = output / "adapter"
    if int(os.environ.get("RANK", "0")) == 0:  # under a distributed launch, one process writes
        with atomic_dir(adapter_dir) as tmp:
            write_adapter_files(qmodel, tmp)
            write_json_atomic(tmp / BASELINE_FILE, info)
    log(f"{method}: {state.global_step} steps in {train_seconds / 60:.1f} min, final loss {train_loss:.4f}; adapter: {adapter_dir}")
    return adapter_dir


def _run_trl(
    kind: str, rows: list[dict[str, Any]], base: Any, config: QAdapterConfig, device: Any, precision: str,
    beta_dpo: float, world: int, output: Path, progress: bool,
) -> tuple[Any, Any, float, int]:
    """Train with TRL's SFTTrainer or DPOTrainer; (PEFT model, trainer state, training loss, rows TRL kept)."""
    import datasets
    from transformers import PrinterCallback, TrainingArguments

    from ..hardware import release_accelerator_precision
    from ..model import lora_config

    common: dict[str, Any] = dict(
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.batch_size // config.micro_batch_size // world,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the steps
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        seed=config.seed,
        optim="adamw_torch",  # torch AdamW, as Q-Adapter's training
        max_length=config.max_length,
        bf16=precision == "bf16",  # TRL's default is bf16, even on CPUs that only emulate it
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        dataloader_drop_last=True,  # full batches only, as Q-Adapter
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=0.05,  # a float < 1 is a fraction of the steps
        report_to="none",
        disable_tqdm=not progress,
    )
    # TRL's default is gradient checkpointing; Q-Adapter keeps activations (transformers 5 renamed the field)
    common["activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"] = False
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()  # TRL's dataset preparation bars
    release_accelerator_precision()  # the Trainer's Accelerator takes this run's precision
    try:
        with tempfile.TemporaryDirectory(prefix=".trl-", dir=output) as trl_dir:  # nothing is saved there
            dataset = datasets.Dataset.from_list(rows)
            if kind == "sft":
                from trl import SFTConfig, SFTTrainer

                args = SFTConfig(output_dir=trl_dir, **common, completion_only_loss=True, packing=False)
                trainer = SFTTrainer(
                    model=base.model, args=args, train_dataset=dataset, processing_class=base.tokenizer, peft_config=lora_config(config)
                )
            else:
                from trl import DPOConfig, DPOTrainer

                # No ref_model: with a PEFT model TRL scores the reference with the adapter disabled, i.e. the base π₁.
                args = DPOConfig(
                    output_dir=trl_dir,
                    **common,
                    beta=beta_dpo,
                    loss_type=["sigmoid"],
                    disable_dropout=False,  # keep LoRA dropout active, as Q-Adapter trains
                )
                trainer = DPOTrainer(
                    model=base.model, args=args, train_dataset=dataset, processing_class=base.tokenizer, peft_config=lora_config(config)
                )
            if not progress:
                trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the log history is saved instead
            n_rows = len(trainer.train_dataset)
            result = trainer.train()
    finally:
        if bars:
            datasets.enable_progress_bars()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.eval()
    return peft_model, trainer.state, result.training_loss, n_rows
