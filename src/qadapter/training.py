"""Training a Q-Adapter: one loop, read top to bottom.

records → token ids → prompt-grouped micro-batches → both passes → objective → AdamW.
accelerate places the model, wraps it for data parallelism (``accelerate launch``) and sets the
precision; nothing else is delegated. The output folder holds ``adapter/`` (the final adapter),
``metrics.json`` and ``checkpoints/step-N/`` (adapter + optimizer, scheduler, RNG and progress).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import objective
from .atomic import write_json_atomic
from .checkpoint import latest_checkpoint, load_trainer_state, restore_trainer_state, rng_state, save_adapter, save_checkpoint
from .collate import TokenizedPair, collate_pairs, prompt_grouped_batches, tokenize_records
from .config import QAdapterConfig
from .data import PreferenceRecord
from .errors import ConfigError, DataError, QAdapterError
from .preference_eval import PreferenceEval, evaluate_preferences, preference_accuracy
from .hardware import EVAL_PRECISION, choose_mixed_precision, default_device, precision_name, release_accelerator_precision
from .model import BUNDLED, LoadedBase, QAdapterModel, load_adapter, load_base
from .progress import Progress
from .run_folder import claimed


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
) -> TrainResult:
    """Train a Q-Adapter on ``train_records``, reporting held-out preference accuracy on ``eval_records``
    before training, every ``eval_every`` steps and at the end.

    ``mixed_precision`` is the training precision (``auto``: bf16 where the hardware has it
    natively); ``eval_precision`` the precision of the held-out evaluations (float32 by default, so
    accuracies do not depend on the machine). ``on_nonfinite``: ``"skip"`` drops an optimizer step whose loss or gradient is NaN/inf,
    ``"stop"`` raises :class:`NonFiniteLoss`. Returns the adapter folder and the metrics written
    to ``metrics.json``.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    if on_nonfinite not in ("skip", "stop"):
        raise ConfigError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
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
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu, gradient_accumulation_steps=accum)
    is_main = accelerator.is_main_process
    if not is_main:  # only rank 0 talks, writes checkpoints and reports
        log = lambda message: None  # noqa: E731
    with contextlib.ExitStack() as held:
        run = held.enter_context(claimed(output, resume=resume, overwrite=overwrite)) if is_main else None  # one writer; nothing of the user's lost
        resume_from = _resume_point(output, resume) if is_main else None
        resume_from = _broadcast(resume_from, accelerator)
        set_seed(config.seed)

        # --- model ----------------------------------------------------------------------------------
        with accelerator.main_process_first():  # the main process converts a GGUF once; the others then read it
            base = base or load_base(model, device=accelerator.device)
        if resume_from is not None:
            qmodel = load_adapter(resume_from, base=base, is_trainable=True)
            if qmodel.config != config:
                raise ConfigError(f"{resume_from} was trained with different settings; resume with the same config")
        else:
            qmodel = QAdapterModel.create(base, config)
        extra_eos = getattr(base.model.generation_config, "eos_token_id", None)

        # --- data -----------------------------------------------------------------------------------
        train_pairs, skipped_train = tokenize_records(train_records, qmodel.tokenizer, config.max_length, config.max_prompt_length, extra_eos)
        eval_pairs, skipped_eval = tokenize_records(eval_records, qmodel.tokenizer, config.max_length, config.max_prompt_length, extra_eos)
        if not train_pairs:
            raise DataError("no training pair survived tokenization: " + "; ".join(skipped_train[:3]))
        if skipped_train or skipped_eval:
            log(f"skipped {len(skipped_train)} training and {len(skipped_eval)} evaluation pairs: {(skipped_train + skipped_eval)[0]}")
        data_digest = _digest(train_pairs, eval_pairs)

        @functools.lru_cache(maxsize=1)
        def epoch_batches(epoch: int) -> list[list[int]]:
            batches = prompt_grouped_batches(train_pairs, config.micro_batch_size, seed=config.seed + epoch)
            full = [b for b in batches if len(b) == config.micro_batch_size]  # equal shares keep DDP exact
            return full[: len(full) - len(full) % micro_per_step]

        steps_per_epoch = len(epoch_batches(0)) // micro_per_step
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(train_pairs)} training pairs are fewer than one batch of {config.batch_size}")
        total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

        # --- optimisation ---------------------------------------------------------------------------
        params = [p for p in qmodel.peft_model.parameters() if p.requires_grad]
        optimizer, scheduler = _optimizer_and_schedule(params, config, total_steps)
        module, optimizer = accelerator.prepare(qmodel.peft_model, optimizer)
        state: dict[str, Any] = {"step": 0, "history": [], "before": None, "train_seconds": 0.0, "skipped_steps": 0, "data_digest": data_digest}
        if resume_from is not None:
            saved = load_trainer_state(resume_from)
            if saved["progress"].get("data_digest") != data_digest:
                raise ConfigError(f"{resume_from} was trained on different data; resume with the same data and split")
            restore_trainer_state(saved, resume_from, optimizer.optimizer, scheduler, accelerator.scaler)
            state = saved["progress"]
            log(f"resumed from {resume_from} at step {state['step']}")

        def checkpoint() -> None:
            if is_main:
                folder = output / "checkpoints" / f"step-{state['step']:06d}"
                save_checkpoint(
                    qmodel,
                    folder,
                    {
                    "optimizer": optimizer.optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "progress": state,
                    **({"scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {}),
                },
                )
                for old in sorted((output / "checkpoints").glob("step-*"))[: -max(1, keep_checkpoints)]:
                    shutil.rmtree(old, ignore_errors=True)
                run.settle()  # a run this one replaces (--overwrite) can go now
            accelerator.wait_for_everyone()

        eval_every = eval_every or max(1, total_steps // 4)
        save_every = save_every or max(1, total_steps // 4)  # cheap: adapter + optimizer state
        bar = Progress(enabled=progress and is_main, log=log)

        def evaluate(label: str) -> PreferenceEval:
            task = bar.add(f"eval ({label})", len(eval_pairs))
            result = evaluate_preferences(
                qmodel, eval_pairs, batch_size=config.micro_batch_size * 2, precision=scoring, on_batch=lambda n: bar.advance(task, n)
            )
            bar.remove(task)
            return result

        log(
            f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs; {total_steps} steps of {config.batch_size} pairs "
            f"({world} process(es) × {accum} accumulated micro-batches of {config.micro_batch_size}); "
            f"training in {precision_name(precision)}, evaluating in {precision_name(scoring)}"
        )
        stop = _StopFlag()
        with bar, stop.installed():
            if state["before"] is None and eval_pairs:
                started = time.perf_counter()
                state["before"] = evaluate("before").to_dict()
                state["eval_seconds"] = time.perf_counter() - started
                log(f"held-out preference accuracy before training: {state['before']['accuracy']:.3f} ({state['eval_seconds']:.0f} s per evaluation)")
            task = bar.add("train", total_steps, completed=state["step"])
            first_step = state["step"]
            qmodel.set_training(True)  # LoRA dropout on; the frozen base stays in eval mode
            window: list[objective.PairObjective] = []
            while state["step"] < total_steps:
                step_started = time.perf_counter()
                epoch, k = divmod(state["step"], steps_per_epoch)
                batches = epoch_batches(epoch)[k * micro_per_step : (k + 1) * micro_per_step][accelerator.process_index :: world]
                finite = True
                for index in batches:
                    batch = collate_pairs([train_pairs[j] for j in index], qmodel.tokenizer.pad_token_id).to(accelerator.device)
                    # accumulate(): gradients are reduced across processes, and the optimizer steps, only on
                    # the last of the `accum` micro-batches; backward() scales the loss by 1/accum.
                    with accelerator.accumulate(module):
                        with accelerator.autocast():
                            out = qmodel.pair_objective(qmodel.token_terms(batch, module=module), batch)
                            loss = out.loss.mean()
                        finite &= bool(torch.isfinite(loss))  # a CPU-GPU sync point, once per micro-batch
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                            finite &= grad_norm is None or bool(torch.isfinite(grad_norm))  # DeepSpeed clips itself
                            finite = _all_ranks(finite, accelerator)  # every replica takes the same decision
                            if not finite and on_nonfinite == "stop":
                                raise NonFiniteLoss(f"non-finite loss or gradient at step {state['step'] + 1}; no update was applied")
                            if finite or accelerator.scaler is not None:
                                optimizer.step()  # with fp16's grad scaler this also backs off the scale (and skips)
                            optimizer.zero_grad(set_to_none=True)  # free gradient memory before the next forward
                    window.append(out)
                if not finite:
                    state["skipped_steps"] += 1
                    log(f"step {state['step'] + 1}: non-finite loss or gradient, update skipped")
                scheduler.step()
                state["step"] += 1
                state["train_seconds"] += time.perf_counter() - step_started
                if state["step"] == first_step + 2:  # the first step pays warm-up costs; estimate from the second
                    log(_time_estimate(time.perf_counter() - step_started, state["step"], total_steps, eval_every, state.get("eval_seconds", 0.0)))
                if state["step"] % max(1, min(10, eval_every)) == 0 or state["step"] == total_steps:
                    state["history"].append({"step": state["step"], "lr": scheduler.get_last_lr()[0], **_window_metrics(window, accelerator)})
                    window = []
                bar.update(task, state["step"], _status(state))
                if eval_pairs and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                    result = evaluate(f"step {state['step']}").to_dict()
                    log(f"step {state['step']}/{total_steps}: held-out preference accuracy {result['accuracy']:.3f}, margin {result['margin_mean']:.2f}")
                    state["history"].append({"step": state["step"], "eval": result})
                    state["last_eval"] = result
                    bar.update(task, state["step"], _status(state))
                stopping = not _all_ranks(not stop.requested, accelerator) and state["step"] < total_steps
                if state["step"] < total_steps and (state["step"] % save_every == 0 or stopping):
                    checkpoint()
                if stopping:  # on the last step, a stop request just lets the run finish
                    raise TrainingInterrupted(f"stopped at step {state['step']} of {total_steps}; a checkpoint was written to {output / 'checkpoints'}")

        adapter_dir = output / "adapter"
        metrics = {
            "pref_accuracy_before": state["before"]["accuracy"] if state["before"] else None,
            "pref_accuracy_after": state.get("last_eval", {}).get("accuracy"),
            "n_eval_pairs": len(eval_pairs),
            "n_train_pairs": len(train_pairs),
            "train_seconds": round(state["train_seconds"], 1),
            "steps": state["step"],
            "skipped_steps": state["skipped_steps"],
            "skipped_pairs": len(skipped_train) + len(skipped_eval),
            "eval_before": state["before"],
            "eval_after": state.get("last_eval"),
            "history": state["history"],
            "config": config.to_dict(),
            "base_model": qmodel.identity.name,
            "precision": precision_name(precision),
            "eval_precision": precision_name(scoring),
            "processes": world,
            **(run_info or {}),
        }
        if is_main:
            save_adapter(qmodel, adapter_dir)
            write_json_atomic(output / "metrics.json", metrics)
        accelerator.wait_for_everyone()
        return TrainResult(adapter_dir, metrics)


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


def _status(state: dict[str, Any]) -> str:
    parts = []
    last = next((h for h in reversed(state["history"]) if "loss" in h), None)
    if last and last["loss"] is not None:
        parts.append(f"loss {last['loss']:.3f} acc {last['rewards/accuracies']:.2f}")
    if "last_eval" in state:
        parts.append(f"held-out acc {state['last_eval']['accuracy']:.3f}")
    return "  ".join(parts)


def _broadcast(value: Any, accelerator: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]
