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

Replay rows (how they are built, and why that way) are documented in :mod:`qadapter.eval.replay`.

Every trained peer is saved as a Q-Adapter folder (PEFT LoRA + ``qadapter_config.json`` with
``q_form="residual"``, α₀ = α̃ = 1, where the customized policy (Q + log π₁) = adapted logits up to a
constant is the adapted model itself) plus ``baseline.json``, so evaluation loads every method with
``QAdapterModel.from_pretrained``. This is the only module that imports TRL.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import environment, tracking
from ..atomic import atomic_dir, write_json_atomic
from ..checkpoint import write_adapter_files
from ..config import QAdapterConfig
from ..data import PreferenceRecord, default_data_dir
from ..errors import ConfigError, DataError
from .replay import DEFAULT_REPLAY_SOURCE, ReplayPrompt, ReplayRecord, default_replay_prompts, replay_count, replay_records

METHODS = ("sft", "dpo", "replay")
REPLAY_BASES = ("dpo", "sft")
BASELINE_FILE = "baseline.json"


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
    report_to: str | Sequence[str] = tracking.NONE,
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
    ``report_to``: experiment trackers TRL logs to (as for Q-Adapter), their local files in ``output_dir/logs``.
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
    log_with = trl_trackers(report_to)
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
    peft_model, state, train_loss, n_rows = _run_trl(kind, rows, base, config, device, precision, beta_dpo, world, output, progress, log_with)
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
        "environment": environment.record(precision),
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


def trl_trackers(report_to: str | Sequence[str]) -> list[str]:
    """The trackers asked for, among those transformers' Trainer also reports to (accelerate knows a few more)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = tracking.trackers(report_to)
    unsupported = [name for name in names if name != "all" and name not in INTEGRATION_TO_CALLBACK]
    if unsupported:
        raise ConfigError(f"report_to: TRL cannot report to {unsupported[0]}; choose among {', '.join(INTEGRATION_TO_CALLBACK)}")
    return names


def _run_trl(
    kind: str, rows: list[dict[str, Any]], base: Any, config: QAdapterConfig, device: Any, precision: str,
    beta_dpo: float, world: int, output: Path, progress: bool, report_to: list[str],
) -> tuple[Any, Any, float, int]:
    """Train with TRL's SFTTrainer or DPOTrainer; (PEFT model, trainer state, training loss, rows TRL kept).
    TRL saves nothing (a scratch ``output_dir``) unless trackers are asked for: then ``output_dir`` is
    ``output/logs``, where transformers' TensorBoard callback writes (``runs/DATE_HOST/``)."""
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
        report_to=report_to or "none",
        disable_tqdm=not progress,
    )
    # TRL's default is gradient checkpointing; Q-Adapter keeps activations (transformers 5 renamed the field)
    common["activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"] = False
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()  # TRL's dataset preparation bars
    release_accelerator_precision()  # the Trainer's Accelerator takes this run's precision
    try:
        with tempfile.TemporaryDirectory(prefix=".trl-", dir=output) as scratch:
            trl_dir = str(output / tracking.LOGS) if report_to else scratch
            dataset = datasets.Dataset.from_list(rows)
            if kind == "sft":
                from trl import SFTConfig, SFTTrainer

                args = SFTConfig(output_dir=trl_dir, **common, completion_only_loss=True, packing=False)
                trainer = SFTTrainer(
                    model=base.model, args=args, train_dataset=dataset, processing_class=base.tokenizer, peft_config=lora_config(config, base.model)
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
                    model=base.model, args=args, train_dataset=dataset, processing_class=base.tokenizer, peft_config=lora_config(config, base.model)
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
