"""float32 against bf16 on this machine, side by side in one run: speed of a training step, a
preference evaluation and decoding, and whether bf16 scoring changes any conclusion.

    python benchmarks/precision.py [--items 500] [--pairs 48] [--repeats 3] [--workers train-qadapter,decode] [--out benchmarks/results]

On a CPU without native bf16 (AVX2) bf16 is emulated and every bf16 worker is many times slower
(there, `--workers train-qadapter` keeps the run short: 'auto' never picks bf16 on such a CPU anyway).

Speed: benchmarks/bench.py's qadapter training-step and decode workers, each run once with 'auto'
forced to float32 and once to bf16 (QADAPTER_AUTO_PRECISION), in their own processes; the
preference evaluation in this process, both precisions on the same held-out pairs.
Agreement: the bundled base model scores ``--items`` retention items (ARC-Easy and PIQA, half each)
in both precisions; reported are the share of items whose picked answer is the same, the log-
likelihood differences, and the pair-margin differences and flipped pairs of the preference evaluation.
Writes ``<out>/precision-<cpu flags>-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the side-by-side workers)

PRECISIONS = ("no", "bf16")


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Training step and decoding in each precision, each in a fresh process."""
    import os

    worker_args = bench.parse_args(["--model", "bundled", "--repeats", str(args.repeats)])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for precision in PRECISIONS:
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", QADAPTER_AUTO_PRECISION=precision)
            out[precision] = {name: bench.run_worker_process(worker_args, name, "bundled", env, Path(tmp)) for name in args.workers}
    return out


def scoring(args: argparse.Namespace) -> dict[str, Any]:
    """Preference evaluation (time and margins) and retention picks, float32 against bf16."""
    from qadapter.collate import tokenize_records
    from qadapter.config import Dial, QAdapterConfig
    from qadapter.data import data_file, default_data_dir, read_records, split_by_prompt
    from qadapter.eval.benchmarks import load_benchmark
    from qadapter.eval.retention import PolicySpec, choice_logliks
    from qadapter.model import QAdapterModel, load_base
    from qadapter.preference_eval import evaluate_preferences_at

    root = default_data_dir()
    base = load_base("bundled", device="cpu")
    adapter = bench.REPO / "experiments" / "dsp-academy" / "qadapter" / "adapter"  # a trained adapter: margins are not all 0
    qmodel = QAdapterModel.from_pretrained(adapter, base=base)
    config = QAdapterConfig()
    records = read_records(data_file(root, "dsp/domain_specific_preference.json"), prefer="academy").records
    _, held_out = split_by_prompt(records, 0.2, seed=config.seed)
    pairs, _ = tokenize_records(held_out[: args.pairs], qmodel.tokenizer, config.max_length, config.max_prompt_length)
    pref: dict[str, Any] = {}
    for precision in PRECISIONS:
        started = time.perf_counter()
        (result,) = evaluate_preferences_at(qmodel, pairs, [Dial()], batch_size=8, precision=precision, keep_pairs=True)
        pref[precision] = {"seconds_per_pair": (time.perf_counter() - started) / len(pairs), "accuracy": result.accuracy, "margins": result.margins}
    margins = [(a, b) for a, b in zip(pref["no"].pop("margins"), pref["bf16"].pop("margins"))]
    half = args.items // 2
    items = load_benchmark("arc_easy", root, n=half, seed=0) + load_benchmark("piqa", root, n=args.items - half, seed=0)
    policies = [PolicySpec("base", base=True), PolicySpec("qadapter")]
    scores: dict[str, Any] = {}
    for precision in PRECISIONS:
        started = time.perf_counter()
        scores[precision] = choice_logliks(qmodel, items, policies, precision=precision)
        scores[f"{precision}_seconds_per_item"] = (time.perf_counter() - started) / len(items)
    agreement = {}
    for policy in ("base", "qadapter"):
        full, half_ = scores["no"][policy], scores["bf16"][policy]
        picks = [max(range(len(f)), key=f.__getitem__) == max(range(len(h)), key=h.__getitem__) for f, h in zip(full, half_)]
        diffs = [abs(a - b) for f, h in zip(full, half_) for a, b in zip(f, h)]
        agreement[policy] = {"same_pick": sum(picks) / len(picks), "n_items": len(picks), "loglik_abs_diff_mean": statistics.mean(diffs), "loglik_abs_diff_max": max(diffs)}
    return {
        "preference": {**pref, "n_pairs": len(pairs), "margin_abs_diff_max": max(abs(a - b) for a, b in margins),
                       "flipped_pairs": sum((a > 0) != (b > 0) for a, b in margins)},
        "retention": {"seconds_per_item": {p: scores[f"{p}_seconds_per_item"] for p in PRECISIONS}, "agreement": agreement},
    }


def markdown(report: dict[str, Any]) -> str:
    s, c = report["speed"], report["scoring"]
    step = {p: s[p]["train-qadapter"]["seconds_per_pair"]["median"] * 4 for p in PRECISIONS}  # bench.py's 4 pairs per step
    rows = [
        ("training step (4 pairs, s)", step["no"], step["bf16"]),
        ("preference evaluation (s per pair)", c["preference"]["no"]["seconds_per_pair"], c["preference"]["bf16"]["seconds_per_pair"]),
        ("retention scoring (s per item, base + adapter)", c["retention"]["seconds_per_item"]["no"], c["retention"]["seconds_per_item"]["bf16"]),
    ]
    if "decode" in s["no"]:
        rows += [(f"decode batch {b}, customized (tok/s)", *(s[p]["decode"][f"batch{b}"]["customized_tokens_per_s"]["median"] for p in PRECISIONS)) for b in (1, 8)]
    lines = [f"# float32 vs bf16 — {report['machine']['cpu']} ({report['cpu_bf16']})", "", "| measure | float32 | bf16 | bf16 / float32 |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3g} | {b:.3g} | {b / a:.2f} |" for name, a, b in rows]
    agree = c["retention"]["agreement"]
    lines += ["", "| agreement (bf16 vs float32) | value |", "|---|---|"]
    for policy, a in agree.items():
        lines.append(f"| {policy}: same picked answer on {a['n_items']} items | {100 * a['same_pick']:.1f}% |")
        lines.append(f"| {policy}: log-likelihood difference, mean / max (nats) | {a['loglik_abs_diff_mean']:.3f} / {a['loglik_abs_diff_max']:.3f} |")
    p = c["preference"]
    lines.append(f"| preference pairs: margin difference max (nats), flipped of {p['n_pairs']} | {p['margin_abs_diff_max']:.3f}, {p['flipped_pairs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=lambda text: text.split(","), default=["train-qadapter", "decode"], help="bench.py workers timed in each precision")
    parser.add_argument("--out", type=Path, default=bench.REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from qadapter.hardware import cpu_has_native_bf16

    report = {"machine": bench.machine(), "cpu_bf16": "native bf16" if cpu_has_native_bf16() else "bf16 emulated (AVX2)", "command": " ".join(sys.argv)}
    report["speed"] = speed(args)
    report["scoring"] = scoring(args)
    stem = args.out / f"precision-{'bf16' if cpu_has_native_bf16() else 'avx2'}-{time.strftime('%Y%m%d-%H%M%S')}"
    bench.write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2))
    text = markdown(report)
    bench.write_atomic(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
