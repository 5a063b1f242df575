"""Results → a Markdown report, a CSV of the dial, and a retention-vs-alignment plot.

Pure formatting over the ``results.json`` schema (no torch): ``methods`` maps a method name to its
metrics (``retention``: {benchmark: accuracy}, ``retention_n``, ``retention_diff``: paired
differences to the base, ``kl_to_base``, ``pref_accuracy``, ``win_rate_vs_base`` and intervals),
and ``sweep`` lists the same adapter at several α₀.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..environment import describe
from .benchmarks import CHANCE, GENERATIVE
from .retention import wilson_interval


def qualifying_benchmarks(base: dict[str, Any], margin: float = 0.05) -> list[str]:
    """Benchmarks on which the base is clearly above chance (95% lower bound > chance + ``margin``):
    only there can forgetting show."""
    keep = []
    for name, acc in base["retention"].items():
        low, _ = wilson_interval(round(acc * base["retention_n"][name]), base["retention_n"][name])
        if low > CHANCE.get(name, 0.0) + margin:
            keep.append(name)
    return keep


def retention_benchmarks(base: dict[str, Any]) -> list[str]:
    """The benchmarks a retention mean is taken over: the qualifying log-likelihood ones (every point of
    the dial has those; generative ones are run for the methods only), or all of those if none qualifies."""
    scored = [b for b in base["retention"] if b not in GENERATIVE]
    return [b for b in qualifying_benchmarks(base) if b in scored] or scored


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _interval(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _diff(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    return f" ({100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], {100 * d['changed']:.0f}% changed)"


def markdown(results: dict[str, Any]) -> str:
    """The report's tables: one row per method, then the α₀ dial."""
    methods = results["methods"]
    benches = list(methods["base"]["retention"])
    keep = set(qualifying_benchmarks(methods["base"]))
    out = io.StringIO()
    out.write(f"# Evaluation: {results.get('model', '')} on {results.get('data', '')}\n\n")
    if results.get("command"):
        out.write(f"Reproduce with:\n\n```\n{results['command']}\n```\n\n")
    if results.get("environment"):
        out.write(describe(results["environment"]) + "\n\n")
    out.write(
        "Accuracies in %, with the number of items; for methods, the paired difference to the base on the same "
        "items with its 95% interval and the share of items whose answer changed. Benchmarks marked * have the base "
        "clearly above chance, so only there can forgetting show.\n\n"
    )
    header = ["method"] + [f"{b}{'*' if b in keep else ''} (n={methods['base']['retention_n'][b]})" for b in benches]
    header += ["KL to base (nats/token)", "held-out pref. acc.", "win rate vs base"]
    out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for name, m in methods.items():
        cells = [name]
        for b in benches:
            cells.append(_pct(m["retention"].get(b)) + _diff(m.get("retention_diff", {}).get(b)))
        kl = m.get("kl_to_base")
        cells.append("0" if name == "base" else ("—" if kl is None else f"{kl:.4f}"))
        cells.append(_pct(m.get("pref_accuracy")) + _interval(m.get("pref_accuracy_ci")) + (f" (n={m['pref_n']})" if m.get("pref_n") else ""))
        cells.append(_pct(m.get("win_rate_vs_base")) + _interval(m.get("win_rate_ci")) + (f" (n={m['win_n']})" if m.get("win_n") else ""))
        out.write("| " + " | ".join(cells) + " |\n")
    if results.get("judge"):
        j = results["judge"]
        out.write(f"\nJudge: {j.get('name')}, held-out pairwise accuracy {_pct(j.get('accuracy'))}%{_interval(j.get('accuracy_ci'))} on {j.get('n')} pairs.\n")
    if results.get("sweep"):
        out.write("\n## The forgetting dial (one adapter, no retraining)\n\n")
        out.write("| α₀ | α̃ | retention (mean of * log-likelihood benchmarks) | held-out pref. acc. | win rate vs base | KL to base |\n|---|---|---|---|---|---|\n")
        for row in results["sweep"]:
            kl = row.get("kl_to_base")
            out.write(
                f"| {row['alpha_0']:g} | {row.get('alpha_tilde', row['alpha_0']):g} | {_pct(row['retention_mean'])} | {_pct(row['pref_accuracy'])} | "
                f"{_pct(row.get('win_rate_vs_base'))} | {'—' if kl is None else f'{kl:.4f}'} |\n"
            )
    return out.getvalue()


def sweep_csv(results: dict[str, Any]) -> str:
    rows = results.get("sweep", [])
    out = io.StringIO()
    fields = ["alpha_0", "alpha_tilde", "retention_mean", "pref_accuracy", "win_rate_vs_base", "kl_to_base"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def retention_mean(method: dict[str, Any], benches: list[str]) -> float | None:
    values = [method["retention"][b] for b in benches if b in method["retention"]]
    return sum(values) / len(values) if values else None


def plot_dial(results: dict[str, Any], path: Path) -> None:
    """Retention (mean over qualifying benchmarks) against alignment, the dial as a curve, the other methods as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    keep = retention_benchmarks(methods["base"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "pref_accuracy", "held-out preference accuracy"), (axes[1], "win_rate_vs_base", "win rate vs base (judge)")):
        sweep = [row for row in results.get("sweep", []) if row.get(key) is not None]
        if sweep:
            ax.plot([r["retention_mean"] for r in sweep], [r[key] for r in sweep], "o-", color="tab:blue", label="Q-Adapter, α₀ dial")
            for r in sweep:
                ax.annotate(f"α₀={r['alpha_0']:g}", (r["retention_mean"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for name, m in methods.items():
            y = m.get(key)
            x = retention_mean(m, keep)
            if y is None and name == "base":
                y = 0.5
            if x is not None and y is not None:
                ax.scatter([x], [y], s=60, marker="s" if name != "qadapter" else "*", zorder=3, label=name)
        ax.set_xlabel(f"retention: mean accuracy on {', '.join(keep)}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Alignment vs retention")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(results: dict[str, Any], out_dir: str | Path) -> None:
    """results.json, report.md, dial.csv and dial.png in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    for name, text in (("report.md", markdown(results) + "\n![retention vs alignment](dial.png)\n"), ("dial.csv", sweep_csv(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    plot_dial(results, out / "dial.png")
