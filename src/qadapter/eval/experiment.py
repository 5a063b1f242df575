"""A full comparison as a chain of resumable stages: train Q-Adapter and its peers, train the judge,
evaluate every policy, sweep the dial, write the report.

Each stage leaves its output in the experiment folder before the next starts and is skipped when
that output exists, so an interrupted run continues where it stopped (training resumes from its last
checkpoint; evaluation from its last finished stage).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import write_json_atomic
from ..config import QAdapterConfig
from ..data import PreferenceRecord
from .judge import BagOfWordsJudge, pairwise_accuracy
from .report import write_report
from .runner import EvalPlan, evaluate

PEERS = ("sft", "dpo", "replay")


def run_experiment(
    output: str | Path,
    train_records: list[PreferenceRecord],
    eval_records: list[PreferenceRecord],
    judge_records: tuple[list[PreferenceRecord], list[PreferenceRecord]],
    prompts: Sequence[Any],
    *,
    config: QAdapterConfig,
    plan: EvalPlan,
    model: str = "bundled",
    peers: Sequence[str] = PEERS,
    sweep: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    info: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the experiment in ``output``; returns the results written to ``results.json``.

    ``train_records``/``eval_records``: the training slice and the held-out pairs (split by prompt);
    ``judge_records``: (fit, test) pairs for the built-in judge; ``prompts``: held-out prompts that every
    policy answers for the judged win rate.
    """
    from ..train import train
    from .baselines import train_baseline

    out = Path(output)
    adapters = {"qadapter": out / "qadapter" / "adapter"}
    if not adapters["qadapter"].is_dir():
        log("stage: train Q-Adapter")
        train(config, train_records, eval_records, out / "qadapter", model=model, resume=True, progress=progress, log=log)
    for peer in peers:
        adapters[peer] = out / peer / "adapter"
        if not adapters[peer].is_dir():
            log(f"stage: train {peer}")
            train_baseline(peer, train_records, out / peer, model=model, config=config, held_out_records=eval_records, progress=progress, log=log)
    judge_dir = out / "judge"
    if not (judge_dir / "judge.json").is_file():
        log("stage: train the judge")
        judge = BagOfWordsJudge().fit(judge_records[0])
        judge.save(judge_dir)
        write_json_atomic(judge_dir / "judge.json", {"name": "bag-of-words Bradley–Terry (built in)", **pairwise_accuracy(judge, judge_records[1]).to_dict()})
    judge = BagOfWordsJudge.load(judge_dir)
    judge_info = _read_json(judge_dir / "judge.json")
    log("stage: evaluate")
    results = evaluate(adapters, plan, eval_records, prompts, out / "cache", judge=judge, sweep=sweep, progress=progress)
    results = {
        **(info or {}),
        "judge": {"name": judge_info["name"], "accuracy": judge_info["accuracy"], "accuracy_ci": [judge_info["low"], judge_info["high"]], "n": judge_info["n_pairs"]},
        **results,
    }
    write_report(results, out)
    return results


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
