"""A reward-model judge trained with TRL's ``RewardTrainer`` on a preference's training split.

The built-in judge (:class:`~qadapter.eval.judge.BagOfWordsJudge`) reads word n-grams of the
response alone. A second judge of a different kind, a transformer that reads prompt and response,
tells whether a win rate measures the preference or the first judge's quirks: the forgetting study
reports both and checks that they agree in direction. The trained folder is a plain Hugging Face
sequence-classification model, so :class:`~qadapter.eval.judge.RewardModelJudge` loads it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import environment
from ..atomic import atomic_dir
from ..data import PreferenceRecord
from .baselines import training_rows

INFO_FILE = "reward_model.json"


@dataclass(frozen=True)
class RewardSettings:
    """How the reward model is trained: the scalar head and the top ``train_layers`` blocks (None: the
    whole model), so the backward pass stops there; on two CPU cores the whole 135M model took about
    120 s per step of 8 pairs. ``max_length``: TRL drops, not truncates, longer pairs; the count kept is
    recorded."""

    epochs: float = 1.0
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_length: int = 512
    train_layers: int | None = 4
    center_rewards_coefficient: float = 0.01  # mean-zero rewards, as TRL recommends
    seed: int = 0


def train_reward_model(
    records: Sequence[PreferenceRecord],
    output: str | Path,
    *,
    model: str = "bundled",
    settings: RewardSettings = RewardSettings(),
    mixed_precision: str = "auto",
    log: Any = print,
) -> Path:
    """Train a reward model on ``records`` (prompt, chosen, rejected) from ``model``'s weights with a
    fresh scalar head, and save it to ``output`` (written whole, then renamed into place)."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, set_seed
    from trl import RewardConfig, RewardTrainer

    from ..hardware import choose_mixed_precision, default_device, release_accelerator_precision
    from ..model import model_source

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    source, revision = model_source(model)
    device = default_device()
    precision = choose_mixed_precision(device, mixed_precision)
    set_seed(settings.seed)  # the head is drawn at load time
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:  # the reward is read at the last non-pad token
        tokenizer.pad_token = tokenizer.eos_token
    net = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    net.config.pad_token_id = tokenizer.pad_token_id
    trained_layers = train_only_top(net, settings.train_layers)
    rows = training_rows("dpo", list(records))  # {prompt, chosen, rejected}: TRL's preference layout
    release_accelerator_precision()  # the Trainer's Accelerator takes this run's precision
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".trl-", dir=out.parent) as trl_dir:  # nothing is saved there
        args = RewardConfig(
            output_dir=trl_dir,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            max_length=settings.max_length,
            center_rewards_coefficient=settings.center_rewards_coefficient,
            seed=settings.seed,
            bf16=precision == "bf16",  # TRL's default is bf16, even on CPUs that only emulate it
            fp16=precision == "fp16",
            use_cpu=device.type == "cpu",
            gradient_checkpointing=False,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=0.1,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = RewardTrainer(model=net, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        kept = len(trainer.train_dataset)
        result = trainer.train()
    seconds = time.perf_counter() - started
    trained = trainer.accelerator.unwrap_model(trainer.model).float().eval()
    info = {
        "trainer": "RewardTrainer",
        "trl_version": trl.__version__,
        "environment": environment.record(precision),
        "base_model": model,
        "base_revision": revision,
        "settings": asdict(settings),
        "precision": precision,
        "trained_layers": trained_layers,
        "n_pairs": len(records),
        "n_pairs_kept": kept,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
    }
    with atomic_dir(out) as tmp:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"reward model: {kept} of {len(records)} pairs, {info['steps']} steps in {seconds / 60:.1f} min, loss {result.training_loss:.4f}: {out}")
    return out


def train_only_top(net: Any, k: int | None) -> int:
    """Freeze all but the classification head, the final norm and the top ``k`` decoder blocks (Llama-style
    models: ``<backbone>.layers``); returns how many blocks train. Where the blocks cannot be found, or
    ``k`` is None, the whole model trains."""
    blocks = getattr(getattr(net, net.base_model_prefix, None), "layers", None)
    if k is None or blocks is None:
        return len(blocks) if blocks is not None else 0
    k = min(k, len(blocks))
    net.requires_grad_(False)
    for module in [*blocks[len(blocks) - k :], net.score, getattr(net, net.base_model_prefix).norm]:
        module.requires_grad_(True)
    return k
