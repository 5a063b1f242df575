"""Methods side by side on the same items: retention, KL to base, held-out preference accuracy and
judged win rate, in the ``results.json`` schema of :mod:`qadapter.eval.report`.

Every finished stage (one benchmark of one adapter, one set of generations, …) is stored as JSON in
a cache folder before the next starts, so an interrupted evaluation resumes where it stopped.
Policies that share an adapter — the base, the customized policy and every point of the α₀ dial —
are scored from the same forward passes.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..collate import render, tokenize_records
from ..config import DecodeConfig
from ..data import PreferenceRecord, data_file, read_records
from ..hardware import EVAL_PRECISION, MixedPrecision, precision_name
from ..progress import Progress
from .benchmarks import DEFAULT_SIZES, ChoiceItem, load_benchmark
from .judge import Judge, win_rate
from ..preference_eval import evaluate_preferences_at
from .report import retention_benchmarks, retention_mean
from .retention import PairedDifference, PolicySpec, choice_accuracy, choice_logliks, choice_picks, generation_correct, kl_to_base, paired_difference, wilson_interval

# Benchmarks whose headline metric is acc_norm (as lm-eval reports them); acc elsewhere (ARC-Easy and
# ARC-Challenge, BoolQ, MMLU).
PRIMARY_NORM = {"hellaswag", "piqa"}
# In the key of every retention stage: 2 = picked options stored beside correctness, exact ties broken
# at random per item (stages cached under 1 hold no picks and broke ties by the first option).
RETENTION_VERSION = 2
KL_SOURCE = "hh-rlhf/helpful-base/test.jsonl.gz"  # general conversations, unrelated to the new preference


@dataclass
class EvalPlan:
    """What to measure, and on how much: the sizes are flags, the defaults fit a 135M model on two cores."""

    data_root: Path
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    kl_texts: int = 40
    max_new_tokens: int = 128
    batch_size: int = 16
    decode_batch_size: int = 32  # greedy answers: 1.9x the prompts per second of batch 8 on two cores (32 prompts, 64 tokens)
    seed: int = 0
    precision: MixedPrecision = EVAL_PRECISION  # every score of every policy, the base's included


def digest(value: Any) -> str:
    """A short, stable fingerprint of JSON-able inputs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageMissing(LookupError):
    """A stage a read-only :class:`StageCache` was asked for has not finished yet."""


class StageCache:
    """One JSON file per finished stage, named by the stage and a digest of everything it depends on
    (the adapter's weights and settings, the items, the policies, the decoding settings): a stage is
    reused only for the very same inputs, never for a changed adapter, data set or dial."""

    def __init__(self, folder: str | Path, *, read_only: bool = False) -> None:
        self.folder = Path(folder)
        self.read_only = read_only  # report from finished stages only: a missing one raises StageMissing

    def get(self, stage: str, inputs: dict[str, Any], compute: Callable[[], Any]) -> Any:
        path = self.folder / f"{stage}-{digest(inputs)}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        if self.read_only:
            raise StageMissing(stage)
        value = compute()
        write_json_atomic(path, {"inputs": inputs, "value": value})
        return value


LATER_SETTINGS_AT_OLD_MEANING = {"adapt_layers": None}  # None: LoRA on every layer, as before the option


def adapter_digest(qmodel: Any) -> str:
    """Fingerprint of an adapter: its trainable weights, its settings and its base model."""
    h = hashlib.sha256()
    for name, param in sorted(qmodel.peft_model.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(param.detach().float().cpu().numpy().tobytes())
    # The base's fields but where to find it (file, sha256: the revision already pins a GGUF's content),
    # so the digests of stages cached before those fields existed stay valid.
    base = {k: v for k, v in qmodel.identity.to_dict().items() if k not in ("file", "sha256")}
    # Likewise settings added later, at the value that means what adapters before them did.
    config = {k: v for k, v in qmodel.config.to_dict().items() if not (k in LATER_SETTINGS_AT_OLD_MEANING and v == LATER_SETTINGS_AT_OLD_MEANING[k])}
    h.update(json.dumps([config, base], sort_keys=True).encode())
    return h.hexdigest()[:16]


def general_texts(tokenizer: Any, data_root: Path, n: int) -> list[tuple[str, str]]:
    """(prompt, response) texts of general conversations for the KL measurement, chat-rendered."""
    records = read_records(data_file(data_root, KL_SOURCE), skip_invalid=True).records[:n]
    return [render(r, tokenizer)[:2] for r in records]


@dataclass
class Method:
    """One adapter and the policies read from it (the base's passes come with every adapter)."""

    name: str
    policies: list[PolicySpec]
    respond: list[str] = field(default_factory=list)  # policies that answer the win-rate prompts
    solve: list[str] = field(default_factory=list)  # policies that also answer generative benchmarks (GSM8K)


def run_method(
    qmodel: Any,
    method: Method,
    plan: EvalPlan,
    pref_records: Sequence[PreferenceRecord],
    win_prompts: Sequence[Any],
    cache: StageCache,
    bar: Progress,
) -> dict[str, Any]:
    """Raw per-item results of every policy of ``method`` (cached stage by stage)."""
    raw: dict[str, Any] = {"retention": {}, "gsm8k": {}, "responses": {}}
    common = {"adapter": adapter_digest(qmodel), "seed": plan.seed, "precision": plan.precision}
    specs = [vars(p) for p in method.policies]
    for bench, n in plan.sizes.items():
        items = load_benchmark(bench, plan.data_root, n=n, seed=plan.seed)
        if isinstance(items[0], ChoiceItem):

            def score(items: list = items, bench: str = bench) -> dict[str, Any]:
                task = bar.add(f"{method.name}: {bench}", sum(len(i.choices) for i in items))
                logliks = choice_logliks(qmodel, items, method.policies, batch_size=plan.batch_size, precision=plan.precision, on_batch=lambda k: bar.advance(task, k))
                bar.remove(task)
                return {name: choice_record(items, ll) for name, ll in logliks.items()}

            raw["retention"][bench] = cache.get(f"{method.name}/retention-{bench}", {**common, "n": n, "policies": specs, "version": RETENTION_VERSION}, score)
        else:
            for policy in (p for p in method.policies if p.name in method.solve):
                raw["gsm8k"][policy.name] = cache.get(
                    f"{method.name}/{bench}-{policy.name}",
                    {**common, "n": n, "policy": vars(policy)},
                    lambda policy=policy, items=items: generation_correct(qmodel, items, policy, precision=plan.precision),
                )
    texts = general_texts(qmodel.tokenizer, plan.data_root, plan.kl_texts)
    raw["kl"] = cache.get(
        f"{method.name}/kl", {**common, "texts": digest(texts), "policies": specs}, lambda: kl_to_base(qmodel, texts, method.policies, batch_size=plan.batch_size // 2, precision=plan.precision)
    )
    extra_eos = getattr(qmodel.peft_model.generation_config, "eos_token_id", None)
    pairs, _ = tokenize_records(list(pref_records), qmodel.tokenizer, qmodel.config.max_length, qmodel.config.max_prompt_length, extra_eos)
    scored = [p for p in method.policies if not p.base]

    def preferences() -> dict[str, Any]:
        task = bar.add(f"{method.name}: preferences", len(pairs))
        evals = evaluate_preferences_at(
            qmodel, pairs, [p.dial for p in scored], batch_size=plan.batch_size // 2, precision=plan.precision, on_batch=lambda k: bar.advance(task, k)
        )
        bar.remove(task)
        return {p.name: e.to_dict() for p, e in zip(scored, evals)}

    try:
        raw["preferences"] = cache.get(f"{method.name}/preferences", {**common, "pairs": digest([vars(p) for p in pairs]), "policies": specs}, preferences)
    except StageMissing:  # a read-only cache (the study's --cached-only): report without preference accuracy
        raw["preferences"] = {}
    for policy in (p for p in method.policies if p.name in method.respond):
        with contextlib.suppress(StageMissing):  # a read-only cache: report the policies that answered
            raw["responses"][policy.name] = cache.get(
                f"{method.name}/responses-{policy.name}",
                {**common, "prompts": digest(list(win_prompts)), "policy": vars(policy), "max_new_tokens": plan.max_new_tokens},
                lambda policy=policy: respond(qmodel, policy, win_prompts, plan, bar, method.name),
            )
    return raw


def choice_record(items: Sequence[ChoiceItem], logliks: Sequence[Sequence[float]]) -> dict[str, list[int]]:
    """One policy's cached retention result: the picked option per item (``pick``, ``pick_norm``) and
    whether it is gold (``acc``, ``acc_norm``), under both conventions of :func:`choice_picks`."""
    (acc, acc_norm), (pick, pick_norm) = choice_accuracy(items, logliks), choice_picks(items, logliks)
    return {"acc": acc, "acc_norm": acc_norm, "pick": pick, "pick_norm": pick_norm}


def respond(qmodel: Any, policy: PolicySpec, prompts: Sequence[Any], plan: EvalPlan, bar: Progress, label: str) -> list[str]:
    """Greedy answers of ``policy`` to the win-rate prompts (the chat template wraps them)."""
    from ..decode import generate

    config = DecodeConfig(max_new_tokens=plan.max_new_tokens, alpha_0=policy.alpha_0, alpha_tilde=policy.alpha_tilde)
    task = bar.add(f"{label}: answers ({policy.name})", len(prompts))
    answers = []
    for start in range(0, len(prompts), plan.decode_batch_size):
        chunk = list(prompts[start : start + plan.decode_batch_size])
        answers += generate(qmodel, chunk, config, policy="base" if policy.base else "customized", precision=plan.precision)
        bar.advance(task, len(chunk))
    bar.remove(task)
    return answers


def primary_keys(bench: str) -> tuple[str, str]:
    """Which of a retention record's conventions a benchmark is reported in: (correctness, pick) keys."""
    return ("acc_norm", "pick_norm") if bench in PRIMARY_NORM else ("acc", "pick")


def paired_records(bench: str, mine: dict[str, list], theirs: dict[str, list]) -> PairedDifference:
    """Two policies' cached retention records on the same items, compared in the benchmark's convention."""
    key, pick = primary_keys(bench)
    return paired_difference(mine[key], theirs[key], method_picks=mine[pick], base_picks=theirs[pick])


def metrics(name: str, raw: dict[str, Any], base_raw: dict[str, Any], judge: Judge | None, prompts: Sequence[Any]) -> dict[str, Any]:
    """The report's metrics of policy ``name``, differences paired against the base on the same items."""
    out: dict[str, Any] = {"retention": {}, "retention_norm": {}, "retention_n": {}, "retention_diff": {}}
    for bench, per_policy in raw["retention"].items():
        mine, base = per_policy[name], base_raw["retention"][bench]["base"]
        key, _ = primary_keys(bench)
        out["retention"][bench] = sum(mine[key]) / len(mine[key])
        out["retention_norm"][bench] = sum(mine["acc_norm"]) / len(mine["acc_norm"])
        out["retention_n"][bench] = len(mine[key])
        if name != "base":
            out["retention_diff"][bench] = vars(paired_records(bench, mine, base))
    if name in raw["gsm8k"]:
        correct = raw["gsm8k"][name]
        out["retention"]["gsm8k"], out["retention_n"]["gsm8k"] = sum(correct) / len(correct), len(correct)
        if name != "base":
            out["retention_diff"]["gsm8k"] = vars(paired_difference(correct, base_raw["gsm8k"]["base"]))
    out["kl_to_base"] = 0.0 if name == "base" else raw["kl"].get(name)
    pref = raw["preferences"].get(name)
    out["pref_accuracy"] = pref["accuracy"] if pref else None
    if pref:
        out["pref_accuracy_ci"] = list(wilson_interval(round(pref["accuracy"] * pref["n_pairs"]), pref["n_pairs"]))
        out["pref_n"] = pref["n_pairs"]
    out["win_rate_vs_base"] = None
    if judge is not None and name != "base" and name in raw["responses"]:
        wr = win_rate(judge, prompts, raw["responses"][name], base_raw["responses"]["base"])
        out["win_rate_vs_base"], out["win_rate_ci"], out["win_n"] = wr.rate, [wr.low, wr.high], wr.n
    return out


def sweep_rows(raw: dict[str, Any], base_raw: dict[str, Any], judge: Judge | None, prompts: Sequence[Any], dial: Sequence[PolicySpec], keep: list[str]) -> list[dict[str, Any]]:
    """One row per point of the α₀ dial."""
    rows = []
    for policy in dial:
        m = metrics(policy.name, raw, base_raw, judge, prompts)
        rows.append(
            {
                "alpha_0": policy.alpha_0,
                "alpha_tilde": policy.alpha_tilde,
                "retention_mean": retention_mean(m, keep),
                "pref_accuracy": m["pref_accuracy"],
                "win_rate_vs_base": m["win_rate_vs_base"],
                "kl_to_base": m["kl_to_base"],
            }
        )
    return rows


def dial_policies(alphas: Sequence[float], tie_alpha_tilde: bool, alpha_tilde: float) -> list[PolicySpec]:
    """Points of the forgetting dial. Tied (α̃ = α₀): π̃ ∝ π₁·exp(Q/α₀), the residual form's dial from
    'the adapted policy' (small α₀) to 'the base' (large α₀); untied: α̃ fixed."""
    return [PolicySpec(f"alpha_0={a:g}", a, a if tie_alpha_tilde else alpha_tilde) for a in alphas]


def evaluate(
    methods: dict[str, Path],
    plan: EvalPlan,
    pref_records: Sequence[PreferenceRecord],
    win_prompts: Sequence[Any],
    cache_dir: str | Path,
    *,
    judge: Judge | None = None,
    sweep: Sequence[float] = (),
    sweep_method: str | None = None,
    tie_alpha_tilde: bool = True,
    progress: bool = True,
    load: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Evaluate each adapter in ``methods`` (name → folder) and the base; sweep the dial of ``sweep_method``.

    Returns ``{"methods": {name: metrics}, "sweep": [...]}``; the base is read from the passes of the
    first method.
    """
    if load is None:
        from ..model import QAdapterModel

        load = QAdapterModel.from_pretrained
    cache = StageCache(cache_dir)
    sweep_method = sweep_method or next(iter(methods))
    raws: dict[str, Any] = {}
    dial: list[PolicySpec] = []
    with Progress(enabled=progress) as bar:
        for i, (name, adapter) in enumerate(methods.items()):
            qmodel = load(adapter)
            own = PolicySpec(name, qmodel.config.alpha_0, qmodel.config.alpha_tilde)
            policies = ([PolicySpec("base", base=True)] if i == 0 else []) + [own]
            solve = [p.name for p in policies]  # the dial's points skip GSM8K: near zero at this scale, and slow
            if name == sweep_method and sweep:
                # a point at the adapter's own (α₀, α̃) is its own policy: scored once, under its name
                dial = [own if (p.alpha_0, p.alpha_tilde) == (own.alpha_0, own.alpha_tilde) else p for p in dial_policies(sweep, tie_alpha_tilde, qmodel.config.alpha_tilde)]
                policies += [p for p in dial if p is not own]
            method = Method(name, policies, respond=[p.name for p in policies], solve=solve)
            raws[name] = run_method(qmodel, method, plan, pref_records, win_prompts, cache, bar)
            del qmodel
    first = next(iter(methods))
    base_raw = raws[first]
    results: dict[str, Any] = {"precision": precision_name(plan.precision), "methods": {"base": metrics("base", base_raw, base_raw, judge, win_prompts)}}
    for name in methods:
        results["methods"][name] = metrics(name, raws[name], base_raw, judge, win_prompts)
    results["methods"]["base"]["pref_accuracy"] = None
    if dial:
        keep = retention_benchmarks(results["methods"]["base"])
        results["sweep"] = sweep_rows(raws[sweep_method], base_raw, judge, win_prompts, dial, keep)
    return results
