"""The report: tables, the dial CSV and the plot from a hand-made results dict."""

from __future__ import annotations

import json

from qadapter.eval.report import markdown, qualifying_benchmarks, retention_mean, sweep_csv, write_report


def _method(arc, boolq, pref=None, win=None, kl=None):
    return {
        "retention": {"arc_easy": arc, "boolq": boolq},
        "retention_n": {"arc_easy": 200, "boolq": 100},
        "retention_diff": {},
        "kl_to_base": kl,
        "pref_accuracy": pref,
        "win_rate_vs_base": win,
    }


RESULTS = {
    "model": "tiny",
    "data": "synthetic",
    "command": "qadapter eval ...",
    "methods": {"base": _method(0.50, 0.53), "qadapter": _method(0.49, 0.52, 0.8, 0.7, 0.01), "dpo": _method(0.45, 0.55, 0.85, 0.75, 0.1)},
    "sweep": [
        {"alpha_0": 1.0, "retention_mean": 0.49, "pref_accuracy": 0.8, "win_rate_vs_base": 0.7, "kl_to_base": 0.01},
        {"alpha_0": 4.0, "retention_mean": 0.50, "pref_accuracy": 0.8, "win_rate_vs_base": 0.55, "kl_to_base": 0.001},
    ],
}


def test_only_benchmarks_above_chance_qualify():
    """ARC-Easy 50% on 200 items is far above 25% chance; BoolQ 53% on 100 items is not above 50%."""
    assert qualifying_benchmarks(RESULTS["methods"]["base"]) == ["arc_easy"]
    assert retention_mean(RESULTS["methods"]["dpo"], ["arc_easy"]) == 0.45


def test_markdown_has_every_method_and_the_dial():
    """One row per method with its numbers, the qualifying marker, and the sweep table."""
    text = markdown(RESULTS)
    for needle in ("| base |", "| qadapter |", "| dpo |", "arc_easy* (n=200)", "boolq (n=100)", "80.0", "0.0100", "| 4 |"):
        assert needle in text


def test_csv_and_files_are_written(tmp_path):
    """write_report leaves results.json, report.md, dial.csv and a PNG, and no temporary files."""
    write_report(RESULTS, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == RESULTS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dial.csv", "dial.png", "report.md", "results.json"]
    assert (tmp_path / "dial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep_csv(RESULTS).splitlines()[0] == "alpha_0,alpha_tilde,retention_mean,pref_accuracy,win_rate_vs_base,kl_to_base"
