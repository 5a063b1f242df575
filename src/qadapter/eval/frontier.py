"""The forgetting study's read-out, pure formatting over its ``results.json`` (no torch).

Schema: ``{"settings": {SETTING: {"methods": {METHOD: {"points": [POINT, ...]}}}}, ...}`` where a
point is ``{"knob": {...}, "win_rate", "win_rate_ci", "pref_accuracy", "kl_to_base", "bpb_delta",
"retention": {BENCH: {"n", "acc", "delta", "delta_ci", "mcnemar_p", "changed", "mde"}}}``. Every
method is a curve across its knob (Q-Adapter's dial, DPO's decoding-time dial, DPO's weight
interpolation); comparisons are made at matched alignment, i.e. at the point of each method whose
judged win rate is closest to the reference method's (DPO, β = 0.1). Until the judged stage has run,
points are matched by KL to the base instead (how far each policy moved, not how well it aligned;
held-out preference accuracy is no substitute: it *falls* as Q-Adapter's dial sharpens the policy),
and every table and plot says so.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..environment import describe

REFERENCE = "dpo"  # the alignment every method is matched to


def retention_delta(point: dict[str, Any], benches: list[str]) -> float | None:
    """Mean over ``benches`` of the paired accuracy difference to the base (None if one is missing)."""
    deltas = [point["retention"][b]["delta"] for b in benches if b in point.get("retention", {})]
    return sum(deltas) / len(deltas) if deltas and len(deltas) == len(benches) else None


AXES = {"win_rate": "judged win rate vs base", "kl_to_base": "KL to base (nats/token)"}


def alignment_axis(setting: dict[str, Any]) -> str:
    """The measure points are matched on: judged win rate once any point has one, else KL to the base
    (available after the retention stage, before generations are judged)."""
    points = [p for m in setting["methods"].values() for p in m["points"]]
    return "win_rate" if any(p.get("win_rate") is not None for p in points) else "kl_to_base"


def _axis_value(axis: str, value: float | None) -> str:
    return _pct(value) if axis == "win_rate" else ("—" if value is None else f"{value:.3f}")


def matched(setting: dict[str, Any], reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """Each method's point whose alignment (see :func:`alignment_axis`) is closest to the reference
    method's first point."""
    axis, methods = alignment_axis(setting), setting["methods"]
    target = next((p[axis] for p in methods.get(reference, {}).get("points", []) if p.get(axis) is not None), None)
    if target is None:
        return {}
    out = {}
    for name, method in methods.items():
        scored = [p for p in method["points"] if p.get(axis) is not None]
        if scored and name != "base":
            out[name] = min(scored, key=lambda p: abs(p[axis] - target))
    return out


def _knob(knob: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in knob.items()) or "—"


def _delta(r: dict[str, Any] | None) -> str:
    if not r:
        return "—"
    lo, hi = r["delta_ci"]
    return f"{100 * r['delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={r['mcnemar_p']:.2g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _win_rates(point: dict[str, Any], judges: list[str]) -> str:
    """Each judge's win rate, the primary first ("—" where a judge has not scored the point)."""
    rates = point.get("win_rates") or {}
    if not rates:
        return _pct(point.get("win_rate"))
    return " / ".join(_pct(rates[j]["rate"]) if j in rates else "—" for j in judges)


def _judges_line(setting: dict[str, Any]) -> str:
    """Who judged, how accurate each judge is on held-out pairs, and whether they agree in direction."""
    parts = [f"`{name}` ({info['name']}): held-out pair accuracy {_pct(info['accuracy'])}% (n={info['n']})" for name, info in setting["judges"].items()]
    text = "Judges, the primary (more accurate) first: " + "; ".join(parts) + "."
    agreement = setting.get("judge_agreement")
    if agreement:
        rho = agreement["spearman"]
        opposed = agreement["opposite_directions"]
        text += f" Rank correlation of their win rates across points: {'—' if rho is None else f'{rho:.2f}'}; "
        text += f"points judged significantly better by one and worse by the other: {', '.join(opposed) if opposed else 'none'}."
    return text


def markdown(results: dict[str, Any]) -> str:
    """Per setting: every point of every method, then the matched-alignment table."""
    out = io.StringIO()
    if results.get("environment"):
        out.write(describe(results["environment"]) + "\n\n")
    for name, setting in results["settings"].items():
        benches = setting.get("benchmarks", [])
        out.write(f"## Setting `{name}`\n\n")
        base = setting["methods"].get("base", {}).get("points", [{}])[0]
        if base.get("retention"):
            out.write("Base accuracy: " + ", ".join(f"{b} {_pct(base['retention'][b]['acc'])}% (n={base['retention'][b]['n']})" for b in benches if b in base["retention"]) + "\n\n")
        judges = list(setting.get("judges") or {})
        if judges and any(p.get("win_rates") for m in setting["methods"].values() for p in m["points"]):
            out.write(_judges_line(setting) + "\n\n")
        out.write(f"| method | knob | win rate vs base ({' / '.join(judges) or 'judge'}) | KL to base | bpb Δ | pref. acc. | " + " | ".join(f"{b} Δ [95%] McNemar p" for b in benches) + " |\n")
        out.write("|---|---|---|---|---|---|" + "---|" * len(benches) + "\n")
        for method, entry in setting["methods"].items():
            if method == "base":
                continue
            for p in entry["points"]:
                ret = p.get("retention", {})
                kl = p.get("kl_to_base")
                bpb = p.get("bpb_delta")
                out.write(
                    f"| {method} | {_knob(p['knob'])} | {_win_rates(p, judges)} | {'—' if kl is None else f'{kl:.3f}'} | "
                    f"{'—' if bpb is None else f'{bpb:+.4f}'} | {_pct(p.get('pref_accuracy'))} | " + " | ".join(_delta(ret.get(b)) for b in benches) + " |\n"
                )
        pairs, axis = matched(setting), alignment_axis(setting)
        if pairs:
            matched_on = "alignment" if axis == "win_rate" else "KL to base (judged win rates pending: matched on change, not on alignment)"
            out.write(f"\n**At matched {matched_on}** (each method's point closest to `{REFERENCE}`'s {AXES[axis]}):\n\n")
            out.write(f"| method | knob | {AXES[axis]} | mean retention Δ | " + " | ".join(f"{b} Δ" for b in benches) + " |\n")
            out.write("|---|---|---|---|" + "---|" * len(benches) + "\n")
            for method, p in pairs.items():
                mean = retention_delta(p, benches)
                out.write(
                    f"| {method} | {_knob(p['knob'])} | {_axis_value(axis, p[axis])} | {'—' if mean is None else f'{100 * mean:+.2f}'} | "
                    + " | ".join(_delta(p.get("retention", {}).get(b)) for b in benches) + " |\n"
                )
        versus = setting.get("versus_reference") or {}
        if versus:
            out.write(f"\n**Head to head at that match**: each method's matched point minus `{REFERENCE}`'s, paired on the same items (negative: forgets more than `{REFERENCE}`):\n\n")
            out.write("| method | point | " + " | ".join(f"{b} Δ vs {REFERENCE} [95%] McNemar p" for b in benches) + " |\n")
            out.write("|---|---|" + "---|" * len(benches) + "\n")
            for method, v in versus.items():
                out.write(f"| {method} | {v['policy']} | " + " | ".join(_delta(v["retention"].get(b)) for b in benches) + " |\n")
        out.write("\n")
    return out.getvalue()


def _curves(setting: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """One curve per method, and per training temperature where a method was trained at several
    (one adapter's dial is a curve; two adapters are two curves, not one zigzag)."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for method, entry in setting["methods"].items():
        if method == "base":
            continue
        for p in entry["points"]:
            a = p["knob"].get("train_temperature")
            curves.setdefault(method if a is None else f"{method} (a = {a:g})", []).append(p)
    return list(curves.items())


def plot(setting: dict[str, Any], path: Path, title: str) -> None:
    """Two panels, one curve per method across its knob: mean retention Δ vs alignment (with the mean's
    95% interval as error bars), and KL to base vs alignment. Before generations are judged (see
    :func:`alignment_axis`): retention Δ vs KL to base, and held-out preference accuracy vs KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches, axis = setting.get("benchmarks", []), alignment_axis(setting)
    scale = 100 if axis == "win_rate" else 1
    right_key = "kl_to_base" if axis == "win_rate" else "pref_accuracy"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method, points in _curves(setting):
        # along the knob from weakest to strongest (rising KL), so a dial whose win rate saturates bends back
        points = sorted((p for p in points if p.get(axis) is not None), key=lambda p: (p.get("kl_to_base") or 0.0, p[axis]))
        if not points:
            continue
        xs = [scale * p[axis] for p in points]
        ys = [retention_delta(p, benches) for p in points]
        if all(y is not None for y in ys):
            # half-width of the mean's 95% interval, the benchmarks' items being independent: sqrt(Σ hᵢ²) / k
            errors = [100 * sum(((p["retention"][b]["delta_ci"][1] - p["retention"][b]["delta_ci"][0]) / 2) ** 2 for b in benches) ** 0.5 / len(benches) for p in points]
            left.errorbar(xs, [100 * y for y in ys], yerr=errors, marker="o", capsize=3, label=method)
        others = [p.get(right_key) for p in points]
        if all(o is not None for o in others):
            right.plot(xs, others, marker="o", label=method)
    xlabel = f"{AXES[axis]} (%)" if axis == "win_rate" else AXES[axis]
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel=xlabel, ylabel="mean retention Δ vs base (points)", title=f"{title}: retention vs {'alignment' if axis == 'win_rate' else 'change'}")
    if axis == "win_rate":
        right.set(xlabel=xlabel, ylabel="KL(π ‖ base) per token", yscale="log", title=f"{title}: KL vs alignment")
    else:
        left.set_xscale("log")
        right.set(xlabel=xlabel, xscale="log", ylabel="held-out preference accuracy", title=f"{title}: preference accuracy vs change")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
