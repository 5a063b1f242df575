"""A full comparison as a chain of resumable stages: train Q-Adapter and its peers, train the judge,
evaluate every policy, sweep the dial, write the report.

Each stage leaves its output in the experiment folder before the next starts and is skipped when
that output exists, so an interrupted run continues where it stopped (Q-Adapter training resumes
from its last checkpoint, a peer's training restarts, evaluation continues from its last finished
stage).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import environment, tracking
from ..atomic import write_json_atomic
from ..config import QAdapterConfig
from ..data import PreferenceRecord
from .judge import BagOfWordsJudge, Judge, RewardModelJudge, pairwise_accuracy
from .report import write_report
from .runner import EvalPlan, digest, evaluate

PEERS = ("sft", "dpo", "replay")
BUILTIN_JUDGE = "builtin"


def prepare_judge(
    spec: str, folder: Path, fit: Sequence[PreferenceRecord], test: Sequence[PreferenceRecord], precision: str = "no"
) -> tuple[Judge, dict[str, Any]]:
    """The judge and how good it is on held-out pairs. ``spec``: ``"builtin"`` (a bag-of-words
    Bradley–Terry model trained on ``fit``, cached in ``folder``) or a Hugging Face reward model."""
    info_path = folder / "held_out_accuracy.json"
    key = digest([spec, [r.prompt_key for r in fit], [r.prompt_key for r in test], len(fit), len(test)])
    fresh = not info_path.is_file() or json.loads(info_path.read_text(encoding="utf-8")).get("key") != key
    if spec == BUILTIN_JUDGE:
        if fresh:  # (re)fit for other data than last time
            judge = BagOfWordsJudge().fit(fit)
            judge.save(folder)
            write_json_atomic(info_path, {"key": key, "name": "built-in bag-of-words Bradley–Terry judge", **pairwise_accuracy(judge, test).to_dict()})
        judge = BagOfWordsJudge.load(folder)
    else:
        judge = RewardModelJudge(spec, precision=precision)
        if fresh:
            write_json_atomic(info_path, {"key": key, "name": spec, **pairwise_accuracy(judge, test).to_dict()})
    return judge, judge_info(folder)


def judge_info(folder: Path) -> dict[str, Any]:
    """What :func:`prepare_judge` measured of a judge: its name and held-out pair accuracy with interval."""
    info = json.loads((folder / "held_out_accuracy.json").read_text(encoding="utf-8"))
    return {"name": info["name"], "accuracy": info["accuracy"], "accuracy_ci": [info["low"], info["high"]], "n": info["n_pairs"]}


def evaluate_and_report(
    output: str | Path,
    adapters: dict[str, Path],
    plan: EvalPlan,
    eval_records: Sequence[PreferenceRecord],
    prompts: Sequence[Any],
    judge: tuple[Judge, dict[str, Any]] | None,
    *,
    sweep: Sequence[float] = (),
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``adapters`` (the first one is swept), then write results.json, report.md and the plot."""
    out = Path(output)
    results = evaluate(adapters, plan, eval_records, prompts, out / "cache", judge=judge[0] if judge else None, sweep=sweep, progress=progress)
    results = {**(info or {}), **({"judge": judge[1]} if judge else {}), **results, "environment": environment.record(results.get("precision"))}
    write_report(results, out)
    return results


def run_experiment(
    output: str | Path,
    train_records: list[PreferenceRecord],
    eval_records: list[PreferenceRecord],
    judge_records: tuple[Sequence[PreferenceRecord], Sequence[PreferenceRecord]],
    prompts: Sequence[Any],
    *,
    config: QAdapterConfig,
    plan: EvalPlan,
    model: str = "bundled",
    peers: Sequence[str] = PEERS,
    sweep: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    judge: str = BUILTIN_JUDGE,
    replay_base: str = "dpo",
    info: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_to: str | Sequence[str] = tracking.NONE,
) -> dict[str, Any]:
    """Run (or continue) the experiment in ``output``; returns the results written to ``results.json``.

    ``train_records``/``eval_records``: the training slice and the held-out pairs (split by prompt);
    ``judge_records``: (fit, test) pairs for the judge; ``prompts``: held-out prompts every policy
    answers for the judged win rate; ``replay_base``: the replay peer trains with ``"dpo"`` or ``"sft"``;
    ``report_to``: experiment trackers every training stage logs to, in its own ``logs/``.
    """
    from ..training import train
    from .baselines import train_baseline, trl_trackers

    # A bad tracker name fails now, not after a stage's training; the peers' TRL knows fewer names than accelerate.
    (trl_trackers if peers else tracking.trackers)(report_to)
    out = Path(output)
    adapters = {"qadapter": out / "qadapter" / "adapter"}
    if not adapters["qadapter"].is_dir():
        log("stage: train Q-Adapter")
        train(
            config, train_records, eval_records, out / "qadapter", model=model, resume=True, eval_precision=plan.precision, progress=progress, log=log, report_to=report_to
        )
    for peer in peers:
        adapters[peer] = out / peer / "adapter"
        if not adapters[peer].is_dir():
            log(f"stage: train {peer}")
            train_baseline(
                peer, train_records, out / peer, model=model, config=config, replay_base=replay_base, held_out_records=eval_records, progress=progress, log=log,
                report_to=report_to,
            )
    log("stage: judge")
    prepared = prepare_judge(judge, out / "judge", *judge_records, precision=plan.precision)
    log("stage: evaluate (cached stage by stage in cache/)")
    return evaluate_and_report(out, adapters, plan, eval_records, prompts, prepared, sweep=sweep, info=info, progress=progress)
