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
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import environment
from ..atomic import write_json_atomic
from ..config import QAdapterConfig
from ..data import PreferenceRecord, data_file, default_data_dir, first_prompts, read_records, split_by_prompt
from ..hardware import EVAL_PRECISION, precision_name
from ..progress import Progress
from . import frontier
from .experiment import judge_info, prepare_judge
from .judge import Judge, WinRate, compare_scores
from .reward_model import train_reward_model
from .retention import PolicySpec, bits_per_byte
from .runner import EvalPlan, Method, StageCache, StageMissing, adapter_digest, digest, general_texts, metrics, paired_records, run_method

BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")  # where a 135M model is above chance
DEFAULT_SIZES = {"arc_easy": 1000, "arc_challenge": 1172, "piqa": 1000, "hellaswag": 1000}
STAGES = ("train", "retention", "bpb", "judge", "judged")


@dataclass(frozen=True)
class Point:
    """One policy on the frontier: the method it stands for, its knob, how it is read from its group."""

    method: str
    knob: dict[str, float]
    policy: PolicySpec


@dataclass(frozen=True)
class Recipe:
    """How to train a group's adapter when it is missing: the method and its settings."""

    method: str  # "qadapter", or a peer of qadapter baseline: "dpo", "sft", "replay"
    config: QAdapterConfig
    replay_base: str = "sft"


@dataclass
class Group:
    """One adapter (its LoRA delta scaled by ``scale``) and the points read from its passes."""

    name: str
    adapter: Path  # <run folder>/adapter
    points: list[Point]
    scale: float = 1.0
    recipe: Recipe | None = None  # None: committed elsewhere, never trained here


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
    bpb_texts: int = 200
    seed: int = 0
    judge_model: str = "bundled"  # the base the reward-model judge is trained from
    records: dict[str, list[PreferenceRecord]] = field(default_factory=dict)

    def split(self) -> dict[str, list[PreferenceRecord]]:
        """``train`` (the slice trained on), ``held_out`` (the evaluation pairs, as ``qadapter train``
        slices them), ``unseen`` (every other pair: never trained on, by any method)."""
        if not self.records:
            records = read_records(data_file(default_data_dir(), self.data), prefer=self.prefer).records
            train, held_out = split_by_prompt(records, 0.2, seed=self.seed)
            sliced, evaluated = first_prompts(train, self.max_train_pairs), first_prompts(held_out, self.max_eval_pairs)
            used = {r.prompt_key for r in sliced + evaluated}
            self.records = {"train": sliced, "held_out": evaluated, "unseen": [r for r in train + held_out if r.prompt_key not in used]}
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
    light = QAdapterConfig()  # the main job's settings
    groups = [
        Group("qadapter-a1", committed / "qadapter" / "adapter",
              [Point("base", {}, PolicySpec("base", base=True)),
               *_dial("qadapter", "qadapter-a1", (1.0, 0.5, 0.25), "alpha_0", lambda t: t, {"train_temperature": 1.0})]),
        Group("dpo", committed / "dpo" / "adapter",
              [Point("dpo", {"beta": 0.1}, PolicySpec("dpo", 1.0, 1.0)),
               *_dial("dpo_dial", "dpo-dial", (2.0, 4.0 / 3.0, 0.5), "lambda", lambda t: round(1 / t, 4), {"beta": 0.1})]),
        Group("qadapter-a0.1", study / "qadapter-a0.1" / "adapter",
              _dial("qadapter", "qadapter-a0.1", (0.1, 0.2, 0.05), "alpha_0", lambda t: t, {"train_temperature": 0.1}),
              recipe=Recipe("qadapter", dataclasses.replace(light, alpha_0=0.1, alpha_tilde=0.1))),
        Group("dpo-interp-0.5", committed / "dpo" / "adapter", [Point("dpo_interp", {"beta": 0.1, "lambda": 0.5}, PolicySpec("dpo-interp@0.5", 1.0, 1.0))], scale=0.5),
        Group("sft", committed / "sft" / "adapter", [Point("sft", {}, PolicySpec("sft", 1.0, 1.0))]),
        Group("replay", committed / "replay" / "adapter", [Point("replay", {"replay_base": "sft"}, PolicySpec("replay", 1.0, 1.0))]),  # type: ignore[dict-item]
    ]
    return Setting("dsp-academy", "dsp/domain_specific_preference.json", "academy", groups)


# The paper's regime: three epochs, LoRA on every linear layer of the blocks at a higher rank.
STRONG = QAdapterConfig(epochs=3.0, lora_r=16, lora_alpha=32.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def strong(repo: Path, name: str, data: str, prefer: str | None) -> Setting:
    """Every method trained here in the paper's regime on ``data``: a customization strong enough that
    the peers should forget (the study is valid only if one does)."""
    root = repo / "experiments" / "forgetting-study" / name

    def group(label: str, method: str, points: list[Point], config: QAdapterConfig = STRONG, scale: float = 1.0) -> Group:
        folder = root / (label if scale == 1.0 else method)
        return Group(label, folder / "adapter", points, scale, Recipe(method, config))

    return Setting(name, data, prefer, [
        group("qadapter-a1", "qadapter", [Point("base", {}, PolicySpec("base", base=True)),
                                          *_dial("qadapter", "qadapter-a1", (1.0, 0.5, 0.25), "alpha_0", lambda t: t, {"train_temperature": 1.0})]),
        group("qadapter-a0.1", "qadapter", _dial("qadapter", "qadapter-a0.1", (0.1, 0.2, 0.05), "alpha_0", lambda t: t, {"train_temperature": 0.1}),
              dataclasses.replace(STRONG, alpha_0=0.1, alpha_tilde=0.1)),
        group("dpo", "dpo", [Point("dpo", {"beta": 0.1}, PolicySpec("dpo", 1.0, 1.0)),
                             *_dial("dpo_dial", "dpo-dial", (2.0, 4.0 / 3.0, 0.5), "lambda", lambda t: round(1 / t, 4), {"beta": 0.1})]),
        group("dpo-interp-0.5", "dpo", [Point("dpo_interp", {"beta": 0.1, "lambda": 0.5}, PolicySpec("dpo-interp@0.5", 1.0, 1.0))], scale=0.5),
        group("sft", "sft", [Point("sft", {}, PolicySpec("sft", 1.0, 1.0))]),
        group("replay", "replay", [Point("replay", {"replay_base": "sft"}, PolicySpec("replay", 1.0, 1.0))]),  # type: ignore[dict-item]
    ])


def settings(repo: Path) -> dict[str, Setting]:
    """Every setting of the study, by name."""
    return {s.name: s for s in (
        dsp_academy(repo),
        strong(repo, "dsp-academy-strong", "dsp/domain_specific_preference.json", "academy"),
        strong(repo, "hh-harmless-strong", "hh-rlhf/harmless-base/test.jsonl.gz", None),  # against the base's habits, as in the paper
    )}


def train_missing(setting: Setting, only: set[str] | None = None, log: Any = print) -> None:
    """Train every group adapter that is missing and has a recipe (resumable: Q-Adapter resumes from
    its last checkpoint, a peer restarts)."""
    from ..training import train
    from .baselines import train_baseline

    split = setting.split()
    for group in setting.groups:
        if group.adapter.is_dir() or group.recipe is None or (only is not None and group.name not in only):
            continue
        run, recipe = group.adapter.parent, group.recipe
        started = time.perf_counter()
        log(f"{setting.name}: training {group.name} ({recipe.method}) into {run}")
        if recipe.method == "qadapter":
            train(recipe.config, split["train"], split["held_out"], run, resume=True, progress=False, log=log)
        else:
            train_baseline(recipe.method, split["train"], run, config=recipe.config, replay_base=recipe.replay_base, held_out_records=split["held_out"], log=log)
        log(f"{setting.name}: {group.name} trained in {(time.perf_counter() - started) / 60:.1f} min")


@contextlib.contextmanager
def loaded(group: Group) -> Iterator[Any]:
    """The group's adapter on a freshly loaded base (PEFT injects LoRA in place), its delta scaled."""
    from ..model import QAdapterModel
    from .retention import scaled_adapter

    qmodel = QAdapterModel.from_pretrained(group.adapter)
    with scaled_adapter(qmodel, group.scale) if group.scale != 1.0 else contextlib.nullcontext():
        yield qmodel


def run_stage(
    setting: Setting, plan: EvalPlan, cache: StageCache, bar: Progress, *, respond: bool, bpb: bool, only: set[str] | None = None, log: Any = print
) -> dict[str, Any]:
    """Every group's raw results for ``plan`` (computed or read from the cache); groups outside ``only``
    (when given) are read from the cache alone. ``bpb``: compute bits per byte where missing (else
    report it only where a previous run finished it)."""
    raws = {}
    read_only = StageCache(cache.folder, read_only=True)
    for group in setting.groups:
        if not group.adapter.is_dir():
            log(f"{setting.name}/{group.name}: {group.adapter} not trained yet, skipped")
            continue
        started = time.perf_counter()
        try:
            raws[group.name] = group_stage(group, setting, plan, cache if only is None or group.name in only else read_only, bar, respond, bpb)
        except StageMissing as missing:  # with --cached-only, or outside --groups
            log(f"{setting.name}/{group.name}: {missing} not finished yet, skipped")
            continue
        log(f"{setting.name}/{group.name}: {', '.join(plan.sizes)} done in {time.perf_counter() - started:.0f} s")
    return raws


def group_stage(group: Group, setting: Setting, plan: EvalPlan, cache: StageCache, bar: Progress, respond: bool, bpb: bool) -> dict[str, Any]:
    """One group's raw results for ``plan``: every point's retention, KL, preferences (and answers), and bits per byte."""
    split = setting.split()
    with loaded(group) as qmodel:
        policies = [p.policy for p in group.points]
        method = Method(group.name, policies, respond=[p.name for p in policies] if respond else [], solve=[])
        raw = run_method(qmodel, method, plan, split["held_out"], setting.prompts(), cache, bar)
        texts = bpb_texts(qmodel.tokenizer, plan, setting.bpb_texts)
        inputs = {"adapter": adapter_digest(qmodel), "scale": group.scale, "texts": digest(texts), "policies": [vars(p) for p in policies], "precision": plan.precision}
        try:
            raw["bpb"] = (cache if bpb else StageCache(cache.folder, read_only=True)).get(
                f"{group.name}/bpb", inputs, lambda: bits_per_byte(qmodel, texts, policies, precision=plan.precision)
            )
        except StageMissing:  # not asked for, or --cached-only: report the group without it
            raw["bpb"] = {}
    return raw


def bpb_texts(tokenizer: Any, plan: EvalPlan, n: int) -> list[tuple[str, str]]:
    """General conversations for bits per byte: HH-RLHF helpful-base answers after the ones the KL
    measurement reads, so the two measures see different texts."""
    return general_texts(tokenizer, plan.data_root, plan.kl_texts + n)[plan.kl_texts :]


def base_group(setting: Setting) -> Group:
    """The group whose passes include the base's own point."""
    return next(g for g in setting.groups if any(p.method == "base" for p in g.points))


Judges = dict[str, tuple[Judge, dict[str, Any]]]  # name → (judge, its held-out accuracy), the primary first


def prepare_judges(setting: Setting, folder: Path, train: bool, log: Any = print) -> Judges:
    """The built-in judge and, once trained (``train``: train it when missing), a TRL reward model on the
    setting's training split; ordered by held-out pair accuracy, the more accurate judge first (primary)."""
    split = setting.split()
    judges = {"builtin": prepare_judge("builtin", folder / "judge", split["train"], split["held_out"])}
    reward_model = folder / "reward-model"
    if train and not reward_model.is_dir():
        started = time.perf_counter()
        train_reward_model(split["train"], reward_model, model=setting.judge_model, log=log)
        log(f"{setting.name}: reward model trained in {(time.perf_counter() - started) / 60:.1f} min")
    measured = folder / "judge-reward-model"
    if reward_model.is_dir():
        judges["reward_model"] = prepare_judge(str(reward_model), measured, split["train"], split["held_out"])
    elif measured.is_dir():  # the model (540 MB) is not committed; the scores it gave are, in the cache
        judges["reward_model"] = (AbsentJudge(reward_model), judge_info(measured))
    return dict(sorted(judges.items(), key=lambda item: -item[1][1]["accuracy"]))


@dataclass(frozen=True)
class AbsentJudge:
    """A judge whose model is not on this machine: its cached scores are reported, new answers cannot be scored."""

    folder: Path

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        raise StageMissing(f"{self.folder} (the reward model; the judged stage trains it again)")


def judged_win_rates(setting: Setting, raws: dict[str, Any], judges: Judges, cache: StageCache) -> dict[str, dict[str, WinRate]]:
    """Per policy with answers, per judge: the win rate of its greedy answers over the base's. Every
    answer set is scored once per judge and cached (rescoring 200 answers with a reward model is slow)."""
    prompts = setting.prompts()
    base_answers = raws.get(base_group(setting).name, {}).get("responses", {}).get("base")
    if base_answers is None:
        return {}

    def scores(name: str, answers: list[str]) -> list[float]:
        judge, info = judges[name]
        inputs = {"judge": [name, info["accuracy"], info["n"]], "prompts": digest(prompts), "answers": digest(answers)}  # no path: a moved folder keeps its scores
        return cache.get(f"judge-{name}/scores", inputs, lambda: judge.score(prompts, answers))

    base_scores = {}  # read once per judge, not once per point
    for name in judges:
        with contextlib.suppress(StageMissing):  # an absent judge that never scored the base's answers is left out
            base_scores[name] = scores(name, base_answers)
    out: dict[str, dict[str, WinRate]] = {}
    for group in setting.groups:
        answered = raws.get(group.name, {}).get("responses", {})
        for point in group.points:
            if point.method == "base" or point.policy.name not in answered:
                continue
            out[point.policy.name] = {}
            for name, base in base_scores.items():
                with contextlib.suppress(StageMissing):  # an absent judge that has not scored these answers is left out
                    out[point.policy.name][name] = compare_scores(scores(name, answered[point.policy.name]), base)
    return out


def judge_agreement(win_rates: dict[str, dict[str, WinRate]]) -> dict[str, Any] | None:
    """Whether the judges agree in direction: the points one judge finds significantly better than the base
    (95% interval above 1/2) and another significantly worse, and the rank correlation of their win rates."""
    from scipy.stats import spearmanr

    names = sorted({name for rates in win_rates.values() for name in rates})
    if len(names) < 2 or len(win_rates) < 3:
        return None
    direction = lambda w: 1 if w.low > 0.5 else -1 if w.high < 0.5 else 0  # noqa: E731
    opposed = [policy for policy, rates in win_rates.items() if {direction(rates[n]) for n in names} >= {1, -1}]
    rho = spearmanr([rates[names[0]].rate for rates in win_rates.values()], [rates[names[1]].rate for rates in win_rates.values()]).statistic
    return {"judges": names[:2], "spearman": None if math.isnan(rho) else float(rho), "opposite_directions": opposed}


def assemble(setting: Setting, raws: dict[str, Any], win_rates: dict[str, dict[str, WinRate]], benches: list[str]) -> dict[str, Any]:
    """The setting's entry of results.json: each method's points in the frontier schema; ``win_rate`` is
    the primary (first) judge's, ``win_rates`` every judge's."""
    base_raw = raws.get(base_group(setting).name)
    methods: dict[str, dict[str, list]] = {}
    if base_raw is None:
        return {"benchmarks": benches, "methods": methods}
    prompts = setting.prompts()
    for group in setting.groups:
        if group.name not in raws:
            continue
        for point in group.points:
            m = metrics(point.policy.name, raws[group.name], base_raw, None, prompts)
            judged = win_rates.get(point.policy.name, {})
            primary = next(iter(judged.values()), None)
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
                "win_rate": primary.rate if primary else None,
                "win_rate_ci": [primary.low, primary.high] if primary else None,
                "win_rates": {name: {"rate": w.rate, "ci": [w.low, w.high], "mean_difference": w.mean_difference} for name, w in judged.items()},
                "pref_accuracy": m["pref_accuracy"],
                "kl_to_base": m["kl_to_base"],
                "bpb": bpb.get(point.policy.name, {}).get("mean") if bpb else None,
                "bpb_delta": _bpb_delta(bpb, point.policy.name, base_raw.get("bpb", {})),
                "retention": retention,
            })
    return {"benchmarks": benches, "methods": methods}


def head_to_head(setting: Setting, raws: dict[str, Any], entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """At matched alignment (:func:`frontier.matched`), each method's point against the reference's
    (DPO, β = 0.1), paired on the same items: accuracy difference with its 95% interval and McNemar p.
    A direct test of "forgets less than DPO", sharper than comparing two differences to the base."""
    matched = frontier.matched(entry)
    reference = matched.get(frontier.REFERENCE)
    where = {p.policy.name: g.name for g in setting.groups for p in g.points}
    if reference is None:
        return {}
    ref_raw = raws[where[reference["policy"]["name"]]]["retention"]
    out: dict[str, dict[str, Any]] = {}
    for method, point in matched.items():
        name = point["policy"]["name"]
        if method == frontier.REFERENCE:
            continue
        mine = raws[where[name]]["retention"]
        out[method] = {"policy": name, "versus": reference["policy"]["name"], "retention": {}}
        for bench in entry["benchmarks"]:
            if bench in mine and bench in ref_raw:
                d = paired_records(bench, mine[bench][name], ref_raw[bench][reference["policy"]["name"]])
                out[method]["retention"][bench] = {"delta": d.mean, "delta_ci": [d.low, d.high], "mcnemar_p": d.mcnemar_p, "changed": d.changed}
    return out


def _bpb_delta(bpb: dict[str, Any], name: str, base_bpb: dict[str, Any]) -> float | None:
    mine, base = bpb.get(name), base_bpb.get("base")
    return None if not mine or not base else mine["mean"] - base["mean"]


def run_setting(
    setting: Setting,
    output: Path,
    stages: list[str],
    sizes: dict[str, int],
    max_new_tokens: int,
    progress: bool,
    cached_only: bool = False,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Train what is missing, run the requested stages, and return the setting's results entry.
    ``cached_only``: compute and train nothing; report the groups whose stages have all finished.
    ``only``: compute the stages of these groups alone (the others are reported from the cache)."""
    folder = output / setting.name
    cache = StageCache(folder / "cache", read_only=cached_only)
    split = setting.split()
    if "train" in stages and not cached_only:
        train_missing(setting, only)
    judges = prepare_judges(setting, folder, train="judge" in stages and not cached_only)
    plan_for = lambda chosen: EvalPlan(data_root=default_data_dir(), sizes=chosen, max_new_tokens=max_new_tokens, precision=EVAL_PRECISION)  # noqa: E731
    raws: dict[str, Any] = {}
    with Progress(enabled=progress) as bar:
        done: dict[str, int] = {}
        for bench, n in sizes.items():  # benchmark-major: each answers a question across every method
            done[bench] = n
            if "retention" in stages:
                raws = run_stage(setting, plan_for(dict(done)), cache, bar, respond=False, bpb="bpb" in stages, only=only)
        if "judged" in stages:
            raws = run_stage(setting, plan_for(sizes), cache, bar, respond=True, bpb="bpb" in stages, only=only)
    benches = [b for b in sizes if b in BENCHMARKS]
    # answers are scored even with --cached-only (a run stopped during the judged stage has answers but no
    # scores yet); a judge whose model is absent is reported from its cached scores alone
    win_rates = judged_win_rates(setting, raws, judges, StageCache(cache.folder)) if "judged" in stages else {}
    entry = assemble(setting, raws, win_rates, benches)
    return {
        **entry,
        "versus_reference": head_to_head(setting, raws, entry),
        "judge": next(iter(judges.values()))[1],
        "judges": {name: info for name, (_, info) in judges.items()},
        "judge_agreement": judge_agreement(win_rates),
        "n_train_pairs": len(split["train"]),
        "n_held_out_pairs": len(split["held_out"]),
        "n_win_prompts": len(setting.prompts()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("experiments/forgetting-study"))
    parser.add_argument("--settings", default="dsp-academy", help="comma-separated: dsp-academy, dsp-academy-strong, hh-harmless-strong")
    parser.add_argument("--stages", default=",".join(STAGES), help="train (missing adapters), retention (benchmarks, KL, preference accuracy), bpb (bits per byte: slow), judge (train the reward-model judge: slow), judged (answers, win rates by every judge there is)")
    parser.add_argument("--sizes", default=",".join(f"{k}={v}" for k, v in DEFAULT_SIZES.items()), help="benchmark=items, in the order they run")
    parser.add_argument("--win-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--groups", default="", help="comma-separated group names (e.g. qadapter-a0.1,dpo): compute only their stages, report the others from the cache")
    parser.add_argument("--cached-only", action="store_true", help="write results.json and report.md from finished stages only (e.g. while a long run is stopped; answers already there are scored by the judges present); a group with a missing stage is left out")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    sizes = {name: int(n) for name, n in (part.split("=") for part in args.sizes.split(",") if part)}
    known = settings(Path(__file__).resolve().parents[3])
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {"settings": {}}
    for name in filter(None, args.settings.split(",")):
        setting = known[name]
        setting.win_prompts = args.win_prompts
        results["settings"][name] = run_setting(setting, args.output, stages, sizes, args.max_new_tokens, not args.no_progress, args.cached_only, set(filter(None, args.groups.split(","))) or None)
        results.update(
            defaults={"qadapter": {"alpha_0": QAdapterConfig().alpha_0, "alpha_tilde": QAdapterConfig().alpha_tilde}},
            command=" ".join(["python -m qadapter.eval.study", *(argv if argv is not None else sys.argv[1:])]),
            precision=precision_name(EVAL_PRECISION),
            environment=environment.record(precision_name(EVAL_PRECISION)),
        )
        write_json_atomic(results_path, results)  # after every setting: an interrupted study keeps what it finished
        (args.output / "report.md").write_text(frontier.markdown(results), encoding="utf-8")
        with contextlib.suppress(ImportError):
            frontier.plot(results["settings"][name], args.output / f"{name}-frontier.png", name)
    print(frontier.markdown(results))


if __name__ == "__main__":
    main()
