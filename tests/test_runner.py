"""The runner's read-out of cached raw results: headline metric per benchmark, paired statistics with
answer changes counted from the picked options (hand-made raw results, no model)."""

from __future__ import annotations

from qadapter.eval.benchmarks import ChoiceItem
from qadapter.eval.report import markdown, qualifying_benchmarks
from qadapter.eval.runner import PRIMARY_NORM, choice_record, metrics


def _record(acc, acc_norm, pick, pick_norm):
    return {"acc": acc, "acc_norm": acc_norm, "pick": pick, "pick_norm": pick_norm}


# four items; gold is option 0 everywhere. acc and acc_norm disagree, so the headline shows which is read.
BASE = _record([1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 2], [3, 3, 3, 3])
METHOD = _record([1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 3, 2], [0, 0, 3, 3])


def _raw(policy, record):
    return {"retention": {b: {policy: record} for b in ("arc_easy", "arc_challenge", "hellaswag")}, "gsm8k": {}, "kl": {}, "preferences": {}, "responses": {}}


def test_arc_challenge_is_read_like_arc_easy():
    """ARC-Challenge's headline is acc, as ARC-Easy's; HellaSwag's is acc_norm."""
    assert "arc_challenge" not in PRIMARY_NORM and {"hellaswag", "piqa"} <= PRIMARY_NORM
    m = metrics("m", _raw("m", METHOD), _raw("base", BASE), None, [])
    assert m["retention"]["arc_challenge"] == m["retention"]["arc_easy"] == 0.25
    assert m["retention"]["hellaswag"] == 0.5
    arc = m["retention_diff"]["arc_challenge"]
    assert arc == m["retention_diff"]["arc_easy"]
    # acc: correctness changed on item 1 only, but the pick changed on items 1 and 2
    assert arc["mean"] == -0.25 and arc["changed"] == 0.5 and arc["mcnemar_p"] == 1.0 and arc["n"] == 4
    hs = m["retention_diff"]["hellaswag"]
    assert hs["mean"] == 0.5 and hs["changed"] == 0.5 and hs["mcnemar_p"] == 0.5
    assert {"mde", "mcnemar_p", "changed"} <= set(hs)


def test_report_marks_arc_challenge_above_chance_like_arc_easy():
    """50% on 200 four-option items is clearly above the 25% chance of either ARC."""
    base = {"retention": {"arc_easy": 0.5, "arc_challenge": 0.5}, "retention_n": {"arc_easy": 200, "arc_challenge": 200}, "retention_diff": {}}
    assert qualifying_benchmarks(base) == ["arc_easy", "arc_challenge"]
    text = markdown({"methods": {"base": base}})
    assert "arc_challenge* (n=200)" in text and "arc_easy* (n=200)" in text


def test_choice_record_keeps_picks_beside_correctness():
    items = [ChoiceItem("r/0", "q", (" a", " bb"), 1), ChoiceItem("r/1", "q", (" a", " b", " c"), 2)]
    # item 0: −1.0 beats −1.2 in total, but −1.2 over 3 characters beats −1.0 over 2 per character
    record = choice_record(items, [[-1.0, -1.2], [-3.0, -2.0, -2.5]])
    assert record == {"acc": [0, 0], "acc_norm": [1, 0], "pick": [0, 1], "pick_norm": [1, 1]}
