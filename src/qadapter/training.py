"""Training a Q-Adapter: one loop, read top to bottom.

records → token ids → prompt-grouped micro-batches → both passes → objective → AdamW.
``train`` is that loop; its pieces are ``_setup`` (model, data, optimizer), ``_train_step`` (one
optimizer step), ``_evaluate`` (held-out accuracy) and ``_save_checkpoint``, and ``TrainState`` is
what a checkpoint records of where the run stands.
accelerate places the model, wraps it for data parallelism (``accelerate launch``) and sets the
precision, and sends the history to the experiment trackers asked for; nothing else is delegated. The
output folder holds ``adapter/`` (the final adapter), ``metrics.json``, ``checkpoints/step-N/``
(adapter + optimizer, scheduler, RNG and progress) and, with trackers, ``logs/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import environment, objective, tracking
from .atomic import write_json_atomic
from .checkpoint import latest_checkpoint, load_trainer_state, restore_trainer_state, rng_state, save_adapter, save_checkpoint
from .collate import TokenizedPair, collate_pairs, prompt_grouped_batches, tokenize_records
from .config import QAdapterConfig
from .data import PreferenceRecord
from .errors import ConfigError, DataError, QAdapterError
from .preference_eval import evaluate_preferences, preference_accuracy
from .hardware import EVAL_PRECISION, choose_mixed_precision, default_device, precision_name, release_accelerator_precision
from .model import BUNDLED, LoadedBase, QAdapterModel, load_adapter, load_base
from .progress import Progress
from .run_folder import RunFolder, claimed


class TrainingInterrupted(QAdapterError):
    """Training stopped on request after writing a checkpoint; the message says how to resume."""


class NonFiniteLoss(QAdapterError):
    """The loss or the gradients became NaN/inf and the run was configured to stop."""


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]


def _optimizer_and_schedule(params: list[torch.nn.Parameter], config: QAdapterConfig, total_steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, scheduler


class _StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _resume_point(output: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; a finished run has none to offer."""
    if not resume:
        return None
    found = latest_checkpoint(output / "checkpoints")
    if found is None and (output / "adapter").exists():
        raise ConfigError(f"{output} holds a finished run and no checkpoint to resume from: use --overwrite to start again")
    return found


@dataclass
class TrainState:
    """Where a run stands: the ``progress`` section of a checkpoint's ``trainer_state.pt``.

    ``to_dict``/``from_dict`` keep that section's keys as they have always been on disk, so older
    checkpoints resume, and :func:`qadapter.checkpoint.load_trainer_state` checks the same layout.
    """

    data_digest: str  # of the token ids trained and evaluated on: resuming on other data is refused
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)  # training-window means and evaluations, by step
    before: dict[str, Any] | None = None  # the held-out evaluation before training
    train_seconds: float = 0.0
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss or gradient
    eval_seconds: float | None = None  # one held-out evaluation's duration, for the time estimate
    last_eval: dict[str, Any] | None = None  # the latest held-out evaluation

    def to_dict(self) -> dict[str, Any]:
        # eval_seconds and last_eval stay absent (not null) until set: the layout checkpoints have always had
        return {key: value for key, value in asdict(self).items() if value is not None or key == "before"}

    @classmethod
    def from_dict(cls, progress: dict[str, Any]) -> "TrainState":
        return cls(**{f.name: progress[f.name] for f in fields(cls) if f.name in progress})


@dataclass
class _Schedule:
    """Which training pairs each optimizer step sees: full prompt-grouped micro-batches, reshuffled
    every epoch, ``micro_per_step`` of them per step, shared round-robin between processes."""

    pairs: list[TokenizedPair]
    micro_batch_size: int
    micro_per_step: int
    seed: int
    _epoch: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False)

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:  # shuffling costs a pass over the data: once per epoch
            batches = prompt_grouped_batches(self.pairs, self.micro_batch_size, seed=self.seed + epoch)
            full = [b for b in batches if len(b) == self.micro_batch_size]  # equal shares keep DDP exact
            self._epoch = (epoch, full[: len(full) - len(full) % self.micro_per_step])
        return self._epoch[1]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch(0)) // self.micro_per_step

    def step_batches(self, step: int, rank: int, world: int) -> list[list[int]]:
        """The micro-batches (lists of pair indices) process ``rank`` trains on at optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch(epoch)[k * self.micro_per_step : (k + 1) * self.micro_per_step][rank::world]


@dataclass
class _Run:
    """What setup builds and the step, evaluation and checkpoint pieces use."""

    config: QAdapterConfig
    accelerator: Any
    qmodel: QAdapterModel
    module: torch.nn.Module  # the PEFT model as accelerate wrapped it (DDP under a distributed launch)
    params: list[torch.nn.Parameter]  # the trainable (LoRA) parameters
    optimizer: Any  # accelerate's wrapper; .optimizer is the torch AdamW
    scheduler: Any
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    skipped_pairs: list[str]  # why each dropped pair (training, then held-out) was dropped
    schedule: _Schedule
    total_steps: int


def _setup(
    config: QAdapterConfig,
    train_records: list[PreferenceRecord],
    eval_records: list[PreferenceRecord],
    accelerator: Any,
    model: str,
    base: LoadedBase | None,
    resume_from: Path | None,
    micro_per_step: int,
    log: Callable[[str], None],
) -> _Run:
    """Load the base and create (or reload) the adapter, tokenize the data, plan the steps, build the optimizer."""
    with accelerator.main_process_first():  # the main process converts a GGUF once; the others then read it
        base = base or load_base(model, device=accelerator.device)
    if resume_from is not None:
        qmodel = load_adapter(resume_from, base=base, is_trainable=True)
        if qmodel.config != config:
            raise ConfigError(f"{resume_from} was trained with different settings; resume with the same config")
    else:
        qmodel = QAdapterModel.create(base, config)

    extra_eos = getattr(base.model.generation_config, "eos_token_id", None)
    lengths = (config.max_length, config.max_prompt_length, extra_eos)
    train_pairs, skipped_train = tokenize_records(train_records, qmodel.tokenizer, *lengths)
    eval_pairs, skipped_eval = tokenize_records(eval_records, qmodel.tokenizer, *lengths)
    if not train_pairs:
        raise DataError("no training pair survived tokenization: " + "; ".join(skipped_train[:3]))
    if skipped_train or skipped_eval:
        log(f"skipped {len(skipped_train)} training and {len(skipped_eval)} evaluation pairs: {(skipped_train + skipped_eval)[0]}")

    schedule = _Schedule(train_pairs, config.micro_batch_size, micro_per_step, config.seed)
    if schedule.steps_per_epoch == 0:
        raise ConfigError(f"{len(train_pairs)} training pairs are fewer than one batch of {config.batch_size}")
    total_steps = config.max_steps or math.ceil(config.epochs * schedule.steps_per_epoch)

    params = [p for p in qmodel.peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer_and_schedule(params, config, total_steps)
    module, optimizer = accelerator.prepare(qmodel.peft_model, optimizer)
    return _Run(
        config, accelerator, qmodel, module, params, optimizer, scheduler, train_pairs, eval_pairs,
        skipped_train + skipped_eval, schedule, total_steps,
    )


def _start_or_resume(run: _Run, resume_from: Path | None, log: Callable[[str], None]) -> TrainState:
    """A fresh state, or the checkpoint's with its optimizer, scheduler, RNG and scaler states put back."""
    state = TrainState(data_digest=_digest(run.train_pairs, run.eval_pairs))
    if resume_from is None:
        return state
    saved = load_trainer_state(resume_from)
    if saved["progress"].get("data_digest") != state.data_digest:
        raise ConfigError(f"{resume_from} was trained on different data; resume with the same data and split")
    restore_trainer_state(saved, resume_from, run.optimizer.optimizer, run.scheduler, run.accelerator.scaler)
    state = TrainState.from_dict(saved["progress"])
    log(f"resumed from {resume_from} at step {state.step}")
    return state


def _train_step(run: _Run, state: TrainState, on_nonfinite: str) -> tuple[list[objective.PairObjective], bool]:
    """One optimizer step over this process's share of the step's micro-batches; the step counters in
    ``state`` advance. Returns the micro-batches' objectives (for the logged means) and whether the
    update was applied (False: non-finite loss or gradient, step skipped)."""
    accelerator, config = run.accelerator, run.config
    started = time.perf_counter()
    outputs = []
    finite = True
    for index in run.schedule.step_batches(state.step, accelerator.process_index, accelerator.num_processes):
        batch = collate_pairs([run.train_pairs[j] for j in index], run.qmodel.tokenizer.pad_token_id).to(accelerator.device)
        # accumulate(): gradients are reduced across processes, and the optimizer steps, only on
        # the last of the `accum` micro-batches; backward() scales the loss by 1/accum.
        with accelerator.accumulate(run.module):
            with accelerator.autocast():
                out = run.qmodel.pair_objective(run.qmodel.token_terms(batch, module=run.module), batch)
                loss = out.loss.mean()
            finite &= bool(torch.isfinite(loss))  # a CPU-GPU sync point, once per micro-batch
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
                finite &= grad_norm is None or bool(torch.isfinite(grad_norm))  # DeepSpeed clips itself
                finite = _all_ranks(finite, accelerator)  # every replica takes the same decision
                if not finite and on_nonfinite == "stop":
                    raise NonFiniteLoss(f"non-finite loss or gradient at step {state.step + 1}; no update was applied")
                if finite or accelerator.scaler is not None:
                    run.optimizer.step()  # with fp16's grad scaler this also backs off the scale (and skips)
                run.optimizer.zero_grad(set_to_none=True)  # free gradient memory before the next forward
        outputs.append(out)
    if not finite:
        state.skipped_steps += 1
    run.scheduler.step()
    state.step += 1
    state.train_seconds += time.perf_counter() - started
    return outputs, finite


def _evaluate(run: _Run, bar: Progress, label: str, precision: str) -> dict[str, Any]:
    """Held-out preference accuracy and margins, as saved in the history and metrics."""
    task = bar.add(f"eval ({label})", len(run.eval_pairs))
    result = evaluate_preferences(
        run.qmodel, run.eval_pairs, batch_size=run.config.micro_batch_size * 2, precision=precision, on_batch=lambda n: bar.advance(task, n)
    )
    bar.remove(task)
    return result.to_dict()


def _save_checkpoint(run: _Run, state: TrainState, output: Path, keep: int, folder_claim: RunFolder | None) -> None:
    """``checkpoints/step-N/`` on the main process (the oldest beyond ``keep`` removed); all processes wait for it."""
    if folder_claim is not None:
        scaler = run.accelerator.scaler
        save_checkpoint(
            run.qmodel,
            output / "checkpoints" / f"step-{state.step:06d}",
            {
                "optimizer": run.optimizer.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": rng_state(),
                "progress": state.to_dict(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            },
        )
        for old in sorted((output / "checkpoints").glob("step-*"))[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
        folder_claim.settle()  # a run this one replaces (--overwrite) can go now
    run.accelerator.wait_for_everyone()


def train(
    config: QAdapterConfig,
    train_records: list[PreferenceRecord],
    eval_records: list[PreferenceRecord],
    output_dir: str | Path,
    *,
    model: str = BUNDLED,
    base: LoadedBase | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_every: int | None = None,
    save_every: int | None = None,
    keep_checkpoints: int = 2,
    on_nonfinite: str = "skip",
    mixed_precision: str = "auto",
    eval_precision: str = EVAL_PRECISION,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run_info: dict[str, Any] | None = None,
    report_to: str | Sequence[str] = tracking.NONE,
) -> TrainResult:
    """Train a Q-Adapter on ``train_records``, reporting held-out preference accuracy on ``eval_records``
    before training, every ``eval_every`` steps and at the end.

    ``mixed_precision`` is the training precision (``auto``: bf16 where the hardware has it
    natively); ``eval_precision`` the precision of the held-out evaluations (float32 by default, so
    accuracies do not depend on the machine). ``on_nonfinite``: ``"skip"`` drops an optimizer step whose loss or gradient is NaN/inf,
    ``"stop"`` raises :class:`NonFiniteLoss`. ``report_to``: experiment trackers ("tensorboard",
    "wandb", "all", … as accelerate names them) that receive the history as it grows, their local
    files in ``output_dir/logs``; a run setting, not the config's, so a resumed run may change it.
    Returns the adapter folder and the metrics written to ``metrics.json``.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    if on_nonfinite not in ("skip", "stop"):
        raise ConfigError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
    log_with = tracking.trackers(report_to)
    output = Path(output_dir)
    on_cpu = default_device().type == "cpu"
    world = PartialState(cpu=on_cpu).num_processes  # cpu=True: several CPU processes use gloo
    micro_per_step = config.batch_size // config.micro_batch_size
    if micro_per_step % world:
        raise ConfigError(
            f"batch_size / micro_batch_size = {micro_per_step} micro-batches per step cannot be shared by {world} processes"
        )
    accum = micro_per_step // world  # micro-batches each process accumulates per optimizer step
    precision = choose_mixed_precision(default_device(), mixed_precision)
    scoring = choose_mixed_precision(default_device(), eval_precision)
    release_accelerator_precision()
    accelerator = Accelerator(
        mixed_precision=precision, cpu=on_cpu, gradient_accumulation_steps=accum, log_with=log_with or None, project_dir=output / tracking.LOGS
    )
    is_main = accelerator.is_main_process
    if not is_main:  # only rank 0 talks, writes checkpoints and reports
        log = lambda message: None  # noqa: E731
    with contextlib.ExitStack() as held:
        folder_claim = held.enter_context(claimed(output, resume=resume, overwrite=overwrite)) if is_main else None  # one writer; nothing of the user's lost
        resume_from = _broadcast(_resume_point(output, resume) if is_main else None, accelerator)
        set_seed(config.seed)
        run = _setup(config, train_records, eval_records, accelerator, model, base, resume_from, micro_per_step, log)
        state = _start_or_resume(run, resume_from, log)
        held.enter_context(tracking.tracked(accelerator, config.to_dict()))  # once the run folder is claimed and the run accepted
        total_steps = run.total_steps
        eval_every = eval_every or max(1, total_steps // 4)
        save_every = save_every or max(1, total_steps // 4)  # cheap: adapter + optimizer state
        log(
            f"{len(run.train_pairs)} training pairs, {len(run.eval_pairs)} held-out pairs; {total_steps} steps of {config.batch_size} pairs "
            f"({world} process(es) × {accum} accumulated micro-batches of {config.micro_batch_size}); "
            f"training in {precision_name(precision)}, evaluating in {precision_name(scoring)}"
        )
        bar = Progress(enabled=progress and is_main, log=log)
        stop = _StopFlag()
        with bar, stop.installed():
            if state.before is None and run.eval_pairs:
                started = time.perf_counter()
                state.before = _evaluate(run, bar, "before", scoring)
                state.eval_seconds = time.perf_counter() - started
                log(f"held-out preference accuracy before training: {state.before['accuracy']:.3f} ({state.eval_seconds:.0f} s per evaluation)")
                accelerator.log(tracking.scalars({"eval": state.before}), step=0)
            task = bar.add("train", total_steps, completed=state.step)
            first_step = state.step
            run.qmodel.set_training(True)  # LoRA dropout on; the frozen base stays in eval mode
            window: list[objective.PairObjective] = []
            while state.step < total_steps:
                step_started = time.perf_counter()
                outputs, finite = _train_step(run, state, on_nonfinite)
                window += outputs
                if not finite:
                    log(f"step {state.step}: non-finite loss or gradient, update skipped")
                if state.step == first_step + 2:  # the first step pays warm-up costs; estimate from the second
                    log(_time_estimate(time.perf_counter() - step_started, state.step, total_steps, eval_every, state.eval_seconds or 0.0))
                if state.step % max(1, min(10, eval_every)) == 0 or state.step == total_steps:
                    _record(run, state, {"step": state.step, "lr": run.scheduler.get_last_lr()[0], **_window_metrics(window, accelerator)})
                    window = []
                bar.update(task, state.step, _status(state))
                if run.eval_pairs and (state.step % eval_every == 0 or state.step == total_steps):
                    state.last_eval = _evaluate(run, bar, f"step {state.step}", scoring)
                    log(f"step {state.step}/{total_steps}: held-out preference accuracy {state.last_eval['accuracy']:.3f}, margin {state.last_eval['margin_mean']:.2f}")
                    _record(run, state, {"step": state.step, "eval": state.last_eval})
                    bar.update(task, state.step, _status(state))
                stopping = not _all_ranks(not stop.requested, accelerator) and state.step < total_steps
                if state.step < total_steps and (state.step % save_every == 0 or stopping):
                    _save_checkpoint(run, state, output, keep_checkpoints, folder_claim)
                if stopping:  # on the last step, a stop request just lets the run finish
                    raise TrainingInterrupted(f"stopped at step {state.step} of {total_steps}; a checkpoint was written to {output / 'checkpoints'}")

        metrics = _final_metrics(run, state, precision_name(precision), precision_name(scoring), run_info)
        adapter_dir = output / "adapter"
        if is_main:
            save_adapter(run.qmodel, adapter_dir)
            write_json_atomic(output / "metrics.json", metrics)
        accelerator.wait_for_everyone()
        return TrainResult(adapter_dir, metrics)


def _final_metrics(run: _Run, state: TrainState, precision: str, eval_precision: str, run_info: dict[str, Any] | None) -> dict[str, Any]:
    """What ``metrics.json`` holds: before/after held-out accuracy, the history, the settings."""
    return {
        "pref_accuracy_before": state.before["accuracy"] if state.before else None,
        "pref_accuracy_after": state.last_eval["accuracy"] if state.last_eval else None,
        "n_eval_pairs": len(run.eval_pairs),
        "n_train_pairs": len(run.train_pairs),
        "train_seconds": round(state.train_seconds, 1),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "skipped_pairs": len(run.skipped_pairs),
        "eval_before": state.before,
        "eval_after": state.last_eval,
        "history": state.history,
        "config": run.config.to_dict(),
        "base_model": run.qmodel.identity.name,
        "precision": precision,
        "eval_precision": eval_precision,
        "processes": run.accelerator.num_processes,
        "environment": environment.record(),
        **(run_info or {}),
    }


def _record(run: _Run, state: TrainState, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the history (saved in checkpoints and metrics.json) and send its numbers to the trackers."""
    state.history.append(entry)
    run.accelerator.log(tracking.scalars(entry), step=entry["step"])


def _all_ranks(flag: bool, accelerator: Any) -> bool:
    """True only if ``flag`` holds on every process (a collective: all ranks must call it)."""
    if accelerator.num_processes == 1:
        return flag
    agreed = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return int(agreed.item()) == accelerator.num_processes


def _digest(*pair_lists: list[TokenizedPair]) -> str:
    """A fingerprint of the token ids a run trains and evaluates on, to refuse resuming on other data."""
    digest = hashlib.sha256()
    for pairs in pair_lists:
        for pair in pairs:
            digest.update(repr((pair.prompt, pair.chosen, pair.rejected)).encode())
        digest.update(b"|")
    return digest.hexdigest()


def _window_metrics(window: list[objective.PairObjective], accelerator: Any) -> dict[str, float | None]:
    """Means over the pairs seen since the last log line, gathered from every process."""
    def mean(parts: list[torch.Tensor]) -> float | None:  # over finite values: a skipped step must not write NaN into metrics.json
        values = accelerator.gather(torch.cat([p.detach().float().reshape(-1) for p in parts]))
        values = values[torch.isfinite(values)]
        return values.mean().item() if values.numel() else None

    return {
        "loss": mean([o.loss for o in window]),
        "bt_loss": mean([o.bt_loss for o in window]),
        "penalty": mean([o.penalty for o in window]),
        "rewards/accuracies": mean([preference_accuracy(o.chosen_rewards, o.rejected_rewards) for o in window]),
        "rewards/chosen": mean([o.chosen_rewards for o in window]),
        "rewards/rejected": mean([o.rejected_rewards for o in window]),
        "rewards/margins": mean([o.chosen_rewards - o.rejected_rewards for o in window]),
    }


def _time_estimate(step_seconds: float, step: int, total_steps: int, eval_every: int, eval_seconds: float) -> str:
    """An honest estimate of what is left: steps at the measured speed plus the evaluations still due
    (every ``eval_every`` steps and at the end)."""
    evals_left = (total_steps // eval_every - step // eval_every + (total_steps % eval_every != 0)) if eval_seconds else 0
    total = (total_steps - step) * step_seconds + evals_left * eval_seconds
    return (
        f"time left ≈ {total / 60:.1f} min: {total_steps - step} steps × {step_seconds:.1f} s"
        + (f" + {evals_left} evaluations × {eval_seconds:.0f} s" if evals_left else "")
    )


def _status(state: TrainState) -> str:
    parts = []
    last = next((h for h in reversed(state.history) if "loss" in h), None)
    if last and last["loss"] is not None:
        parts.append(f"loss {last['loss']:.3f} acc {last['rewards/accuracies']:.2f}")
    if state.last_eval is not None:
        parts.append(f"held-out acc {state.last_eval['accuracy']:.3f}")
    return "  ".join(parts)


def _broadcast(value: Any, accelerator: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]
