"""The forgetting study: every method across its own strength knob, on one frontier, resumable.

    python -m qadapter.eval.study --output experiments/forgetting-study [--stages retention,judged] [--sizes ...]

A *group* is one loaded adapter (optionally with its LoRA delta scaled, for weight interpolation);
its base and adapter passes serve all of its *points* (the policies read from them at different
(α₀, α̃)). Stages run benchmark by benchmark across all groups, so the question asked first (does any
method forget on ARC-Easy?) is answered before the slower benchmarks start; every finished stage is a
file in ``cache/`` (see :class:`~qadapter.eval.runner.StageCache`), so rerunning the command continues
where it stopped. ``results.json`` (schema in :mod:`qadapter.eval.frontier`) is rewritten from the cache
at the end of every run, with whatever is finished.

Methods and knobs (DSP "academy", the main job's data and budget):

- ``qadapter``: residual Q trained at temperature a = α₀ = α̃ ∈ {1, 0.1}; its dial, tied α₀ = α̃ = t,
  reads π₁·exp(Q/t) from the same adapter without retraining.
- ``dpo`` (TRL, β = 0.1) and ``dpo_dial``: the DPO adapter read as a residual Q (log π_dpo − log π₁ up
  to a per-state constant) at α₀ = α̃ = 1/λ, i.e. π₁·(π_dpo/π₁)^λ: decoding-time realignment.
- ``dpo_interp``: the DPO LoRA delta scaled by λ (WiSE-FT-style weight interpolation).
- ``sft``, ``replay``: one point each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import write_json_atomic
from ..config import QAdapterConfig
from ..data import PreferenceRecord, data_file, default_data_dir, first_prompts, read_records, split_by_prompt
from ..hardware import EVAL_PRECISION, precision_name
from ..progress import Progress
from . import frontier
from .experiment import prepare_judge
from .judge import Judge
from .retention import PolicySpec, bits_per_byte
from .runner import EvalPlan, Method, StageCache, adapter_digest, digest, general_texts, metrics, run_method

BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")  # where a 135M model is above chance
DEFAULT_SIZES = {"arc_easy": 1000, "arc_challenge": 1172, "piqa": 1000, "hellaswag": 1000}
STAGES = ("retention", "judged")
BPB_TEXTS = 200


@dataclass(frozen=True)
class Point:
    """One policy on the frontier: the method it stands for, its knob, how it is read from its group."""

    method: str
    knob: dict[str, float]
    policy: PolicySpec


@dataclass
class Group:
    """One adapter (its LoRA delta scaled by ``scale``) and the points read from its passes."""

    name: str
    adapter: Path
    points: list[Point]
    scale: float = 1.0


@dataclass
class Setting:
    """A preference data set, its split and slice (as ``qadapter train`` makes them), and the groups."""

    name: str
    data: str  # relative to the data folder
    prefer: str | None
    groups: list[Group]
    max_train_pairs: int = 480
    max_eval_pairs: int = 100
    win_prompts: int = 200
    seed: int = 0
    records: dict[str, list[PreferenceRecord]] = field(default_factory=dict)

    def split(self) -> dict[str, list[PreferenceRecord]]:
        """``train`` (the slice trained on), ``held_out`` (the evaluation pairs), ``unseen`` (pairs of
        training-split prompts outside the slice: never trained on, by any method)."""
        if not self.records:
            records = read_records(data_file(default_data_dir(), self.data), prefer=self.prefer).records
            train, held_out = split_by_prompt(records, 0.2, seed=self.seed)
            sliced = first_prompts(train, self.max_train_pairs)
            used = {r.prompt_key for r in sliced}
            self.records = {"train": sliced, "held_out": held_out, "unseen": [r for r in train if r.prompt_key not in used]}
        return self.records

    def prompts(self) -> list[Any]:
        """Win-rate prompts nobody trained on: the held-out ones first, then unseen training-split ones."""
        split = self.split()
        distinct = {r.prompt_key: r.prompt for r in split["held_out"] + split["unseen"]}
        return list(distinct.values())[: self.win_prompts]


def _dial(method: str, label: str, temperatures: Sequence[float], knob_name: str, knob_of: Any, extra: dict[str, float]) -> list[Point]:
    return [Point(method, {**extra, knob_name: knob_of(t)}, PolicySpec(f"{label}@{t:g}", t, t)) for t in temperatures]


def dsp_academy(repo: Path) -> Setting:
    """The main job's data and budget, with the adapters committed in experiments/dsp-academy and the
    study's own (Q-Adapter trained at a = 0.1)."""
    committed = repo / "experiments" / "dsp-academy"
    study = repo / "experiments" / "forgetting-study" / "dsp-academy"
    groups = [
        Group("qadapter-a1", committed / "qadapter" / "adapter",
              [Point("base", {}, PolicySpec("base", base=True)),
               *_dial("qadapter", "qadapter-a1", (1.0, 0.5, 0.25), "alpha_0", lambda t: t, {"train_temperature": 1.0})]),
        Group("dpo", committed / "dpo" / "adapter",
              [Point("dpo", {"beta": 0.1}, PolicySpec("dpo", 1.0, 1.0)),
               *_dial("dpo_dial", "dpo-dial", (2.0, 4.0 / 3.0, 0.5), "lambda", lambda t: round(1 / t, 4), {"beta": 0.1})]),
        Group("qadapter-a0.1", study / "qadapter-a0.1" / "adapter",
              _dial("qadapter", "qadapter-a0.1", (0.1, 0.2, 0.05), "alpha_0", lambda t: t, {"train_temperature": 0.1})),
        Group("dpo-interp-0.5", committed / "dpo" / "adapter", [Point("dpo_interp", {"beta": 0.1, "lambda": 0.5}, PolicySpec("dpo-interp@0.5", 1.0, 1.0))], scale=0.5),
        Group("sft", committed / "sft" / "adapter", [Point("sft", {}, PolicySpec("sft", 1.0, 1.0))]),
        Group("replay", committed / "replay" / "adapter", [Point("replay", {"replay_base": "sft"}, PolicySpec("replay", 1.0, 1.0))]),  # type: ignore[dict-item]
    ]
    return Setting("dsp-academy", "dsp/domain_specific_preference.json", "academy", groups)


@contextlib.contextmanager
def loaded(group: Group) -> Iterator[Any]:
    """The group's adapter on a freshly loaded base (PEFT injects LoRA in place), its delta scaled."""
    from ..model import QAdapterModel
    from .retention import scaled_adapter

    qmodel = QAdapterModel.from_pretrained(group.adapter)
    with scaled_adapter(qmodel, group.scale) if group.scale != 1.0 else contextlib.nullcontext():
        yield qmodel


def run_stage(setting: Setting, plan: EvalPlan, cache: StageCache, bar: Progress, *, respond: bool, judge: Judge | None, log: Any = print) -> dict[str, Any]:
    """Every group's raw results for ``plan`` (computed or read from the cache)."""
    split = setting.split()
    raws = {}
    for group in setting.groups:
        if not group.adapter.is_dir():
            log(f"{setting.name}/{group.name}: {group.adapter} not trained yet, skipped")
            continue
        started = time.perf_counter()
        with loaded(group) as qmodel:
            policies = [p.policy for p in group.points]
            method = Method(group.name, policies, respond=[p.name for p in policies] if respond else [], solve=[])
            raws[group.name] = run_method(qmodel, method, plan, split["held_out"], setting.prompts(), cache, bar)
            texts = bpb_texts(qmodel.tokenizer, plan)
            raws[group.name]["bpb"] = cache.get(
                f"{group.name}/bpb",
                {"adapter": adapter_digest(qmodel), "scale": group.scale, "texts": digest(texts), "policies": [vars(p) for p in policies], "precision": plan.precision},
                lambda: bits_per_byte(qmodel, texts, policies, precision=plan.precision),
            )
        log(f"{setting.name}/{group.name}: {', '.join(plan.sizes)} done in {time.perf_counter() - started:.0f} s")
    return raws


def bpb_texts(tokenizer: Any, plan: EvalPlan) -> list[tuple[str, str]]:
    """General conversations for bits per byte: HH-RLHF helpful-base answers after the ones the KL
    measurement reads, so the two measures see different texts."""
    return general_texts(tokenizer, plan.data_root, plan.kl_texts + BPB_TEXTS)[plan.kl_texts :]


def assemble(setting: Setting, raws: dict[str, Any], judge: Judge | None, benches: list[str]) -> dict[str, Any]:
    """The setting's entry of results.json: each method's points in the frontier schema."""
    base_group = next(g for g in setting.groups if any(p.method == "base" for p in g.points))
    base_raw = raws.get(base_group.name)
    methods: dict[str, dict[str, list]] = {}
    if base_raw is None:
        return {"benchmarks": benches, "methods": methods}
    prompts = setting.prompts()
    for group in setting.groups:
        if group.name not in raws:
            continue
        for point in group.points:
            m = metrics(point.policy.name, raws[group.name], base_raw, judge, prompts)
            retention = {}
            for bench in benches:
                if bench in m["retention"] and point.method != "base":
                    d = m["retention_diff"][bench]
                    retention[bench] = {"n": m["retention_n"][bench], "acc": m["retention"][bench], "delta": d["mean"], "delta_ci": [d["low"], d["high"]],
                                        "mcnemar_p": d["mcnemar_p"], "changed": d["changed"], "mde": d["mde"]}
                elif bench in m["retention"]:
                    retention[bench] = {"n": m["retention_n"][bench], "acc": m["retention"][bench]}
            bpb = raws[group.name].get("bpb", {})
            methods.setdefault(point.method, {"points": []})["points"].append({
                "knob": point.knob,
                "policy": vars(point.policy),
                "win_rate": m["win_rate_vs_base"],
                "win_rate_ci": m.get("win_rate_ci"),
                "pref_accuracy": m["pref_accuracy"],
                "kl_to_base": m["kl_to_base"],
                "bpb": bpb.get(point.policy.name, {}).get("mean") if bpb else None,
                "bpb_delta": _bpb_delta(bpb, point.policy.name, base_raw.get("bpb", {})),
                "retention": retention,
            })
    return {"benchmarks": benches, "methods": methods}


def _bpb_delta(bpb: dict[str, Any], name: str, base_bpb: dict[str, Any]) -> float | None:
    mine, base = bpb.get(name), base_bpb.get("base")
    return None if not mine or not base else mine["mean"] - base["mean"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("experiments/forgetting-study"))
    parser.add_argument("--stages", default=",".join(STAGES), help="retention (benchmarks, KL, bpb, preference accuracy) and/or judged (answers and win rates)")
    parser.add_argument("--sizes", default=",".join(f"{k}={v}" for k, v in DEFAULT_SIZES.items()), help="benchmark=items, in the order they run")
    parser.add_argument("--win-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    sizes = {name: int(n) for name, n in (part.split("=") for part in args.sizes.split(",") if part)}
    repo = Path(__file__).resolve().parents[3]
    setting = dsp_academy(repo)
    setting.win_prompts = args.win_prompts
    folder = args.output / setting.name
    cache = StageCache(folder / "cache")
    split = setting.split()
    judge, judge_info = prepare_judge("builtin", folder / "judge", split["train"], split["held_out"])
    plan_for = lambda chosen: EvalPlan(data_root=default_data_dir(), sizes=chosen, max_new_tokens=args.max_new_tokens, precision=EVAL_PRECISION)  # noqa: E731
    raws: dict[str, Any] = {}
    with Progress(enabled=not args.no_progress) as bar:
        done: dict[str, int] = {}
        if "retention" in stages:
            for bench, n in sizes.items():  # benchmark-major: each answers a question across every method
                done[bench] = n
                raws = run_stage(setting, plan_for(dict(done)), cache, bar, respond=False, judge=judge)
        if "judged" in stages:
            raws = run_stage(setting, plan_for(sizes), cache, bar, respond=True, judge=judge)
    benches = [b for b in sizes if b in BENCHMARKS]
    results = {
        "settings": {setting.name: {**assemble(setting, raws, judge if "judged" in stages else None, benches), "judge": judge_info,
                                    "n_train_pairs": len(split["train"]), "n_held_out_pairs": len(split["held_out"]), "n_win_prompts": len(setting.prompts())}},
        "defaults": {"qadapter": {"alpha_0": QAdapterConfig().alpha_0, "alpha_tilde": QAdapterConfig().alpha_tilde}},
        "command": " ".join(["python -m qadapter.eval.study", *(argv if argv is not None else sys.argv[1:])]),
        "precision": precision_name(EVAL_PRECISION),
    }
    write_json_atomic(args.output / "results.json", results)
    (args.output / "report.md").write_text(frontier.markdown(results), encoding="utf-8")
    with contextlib.suppress(ImportError):
        frontier.plot(results["settings"][setting.name], args.output / f"{setting.name}-frontier.png", setting.name)
    print(frontier.markdown(results))


if __name__ == "__main__":
    main()
