"""The forgetting study end to end on the tiny model: every method's points in the schema, resumable."""

from __future__ import annotations

import json

from qadapter.eval import frontier
from qadapter.eval.retention import PolicySpec
from qadapter.eval.study import Group, Point, Setting, run_setting

from conftest import random_adapter


def tiny_setting(tiny_model_dir, tmp_path) -> Setting:
    a = random_adapter(tiny_model_dir, tmp_path / "a" / "adapter", seed=1)
    b = random_adapter(tiny_model_dir, tmp_path / "b" / "adapter", seed=2)
    groups = [
        Group("qadapter-a1", a, [Point("base", {}, PolicySpec("base", base=True)),
                                 *(Point("qadapter", {"alpha_0": t}, PolicySpec(f"q@{t:g}", t, t)) for t in (1.0, 0.5))]),
        Group("dpo", b, [Point("dpo", {"beta": 0.1}, PolicySpec("dpo", 1.0, 1.0)), Point("dpo_dial", {"lambda": 0.5}, PolicySpec("dpo-dial@2", 2.0, 2.0))]),
        Group("dpo-interp-0.5", b, [Point("dpo_interp", {"lambda": 0.5}, PolicySpec("dpo-interp@0.5", 1.0, 1.0))], scale=0.5),
        Group("missing", tmp_path / "nowhere" / "adapter", [Point("sft", {}, PolicySpec("sft", 1.0, 1.0))]),
    ]
    return Setting("tiny", "dsp/domain_specific_preference.json", "academy", groups, max_train_pairs=40, max_eval_pairs=8, win_prompts=3, bpb_texts=6,
                   judge_model=str(tiny_model_dir))


def test_study_writes_every_point_in_the_schema_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    setting = tiny_setting(tiny_model_dir, tmp_path)
    entry = run_setting(setting, tmp_path / "study", ["retention", "bpb", "judge", "judged"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False)
    methods = entry["methods"]
    assert set(methods) == {"base", "qadapter", "dpo", "dpo_dial", "dpo_interp"}  # the untrained group is skipped
    assert [p["knob"] for p in methods["qadapter"]["points"]] == [{"alpha_0": 1.0}, {"alpha_0": 0.5}]
    for method, entry_ in methods.items():
        for point in entry_["points"]:
            assert set(point["retention"]) == {"arc_easy", "piqa"}
            if method == "base":
                continue
            assert 0 <= point["win_rate"] <= 1 and point["kl_to_base"] >= 0 and point["bpb_delta"] is not None
            assert set(point["win_rates"]) == {"builtin", "reward_model"}  # two judges of different kinds
            assert point["win_rate"] == point["win_rates"][next(iter(entry["judges"]))]["rate"]  # the primary: the first judge
            for bench in ("arc_easy", "piqa"):
                r = point["retention"][bench]
                assert {"n", "acc", "delta", "delta_ci", "mcnemar_p", "changed", "mde"} <= set(r) and 0 <= r["mcnemar_p"] <= 1
    accuracies = [info["accuracy"] for info in entry["judges"].values()]
    assert accuracies == sorted(accuracies, reverse=True) and entry["judge"] == next(iter(entry["judges"].values()))
    assert (tmp_path / "study" / "tiny" / "reward-model" / "reward_model.json").is_file()
    agreement = entry["judge_agreement"]
    assert agreement["judges"] == ["builtin", "reward_model"] and isinstance(agreement["opposite_directions"], list)
    versus = entry["versus_reference"]  # matched points against DPO's, paired on the same items
    assert set(versus) == {"qadapter", "dpo_dial", "dpo_interp"} and all(v["versus"] == "dpo" for v in versus.values())
    for v in versus.values():
        assert set(v["retention"]) == {"arc_easy", "piqa"} and all(0 <= r["mcnemar_p"] <= 1 and r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1] for r in v["retention"].values())
    stages = sorted(p.name for p in (tmp_path / "study" / "tiny" / "cache").rglob("*.json"))
    partial = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention"], {"arc_easy": 8, "piqa": 7}, max_new_tokens=4, progress=False, cached_only=True)
    assert partial["methods"] == {}  # piqa=7 never ran: every group is left out, nothing is computed
    assert sorted(p.name for p in (tmp_path / "study" / "tiny" / "cache").rglob("*.json")) == stages
    again = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention", "bpb", "judge", "judged"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False)
    assert again == entry and sorted(p.name for p in (tmp_path / "study" / "tiny" / "cache").rglob("*.json")) == stages  # all from the cache
    (tmp_path / "study" / "tiny" / "reward-model").rename(tmp_path / "elsewhere")  # 540 MB at full size: not committed
    absent = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention", "bpb", "judge", "judged"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False, cached_only=True)
    assert absent == entry  # its scores are cached
    for path in (tmp_path / "study" / "tiny" / "cache" / "judge-builtin").glob("*.json"):
        path.unlink()  # as after a run stopped before its answers were scored
    assert run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention", "bpb", "judged"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False, cached_only=True) == entry
    results = {"settings": {"tiny": entry}}
    text = frontier.markdown(results)
    assert "At matched alignment" in text and "Head to head" in text and json.dumps(results)
    assert "Judges, the primary (more accurate) first: `" in text and "win rate vs base (" + " / ".join(entry["judges"]) + ")" in text
    frontier.plot(entry, tmp_path / "frontier.png", "tiny")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    one = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention"], {"arc_easy": 8, "piqa": 6, "hellaswag": 3}, max_new_tokens=4, progress=False, only={"dpo"})
    assert one["methods"] == {}  # only dpo computed hellaswag: the base's group lacks it, so nothing compares yet
    assert list((tmp_path / "study" / "tiny" / "cache" / "dpo").glob("retention-hellaswag-*.json"))
    assert not list((tmp_path / "study" / "tiny" / "cache").rglob("qadapter-a1/retention-hellaswag-*.json"))
    for pattern in ("bpb-*.json", "preferences-*.json"):  # the two stages after retention and KL, unfinished
        for path in (tmp_path / "study" / "tiny" / "cache").rglob(pattern):
            path.unlink()
    partial = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False, cached_only=True)
    point = partial["methods"]["qadapter"]["points"][0]
    assert point["bpb_delta"] is None and point["pref_accuracy"] is None and point["retention"] == entry["methods"]["qadapter"]["points"][0]["retention"]
    rerun = run_setting(tiny_setting(tiny_model_dir, tmp_path), tmp_path / "study", ["retention"], {"arc_easy": 8, "piqa": 6}, max_new_tokens=4, progress=False)
    assert rerun["methods"]["qadapter"]["points"][0]["pref_accuracy"] is not None  # recomputed
    assert rerun["methods"]["qadapter"]["points"][0]["bpb_delta"] is None and not list((tmp_path / "study").rglob("bpb-*.json"))  # not asked for


def test_matched_alignment_picks_the_closest_win_rate():
    def point(w: float, d: float) -> dict:
        return {"knob": {}, "win_rate": w, "retention": {"arc_easy": {"delta": d, "delta_ci": [d - 0.01, d + 0.01], "mcnemar_p": 0.5}}}

    setting = {"benchmarks": ["arc_easy"], "methods": {"dpo": {"points": [point(0.9, -0.04)]}, "qadapter": {"points": [point(0.5, 0.0), point(0.85, -0.02), point(0.99, -0.06)]}}}
    picked = frontier.matched(setting)
    assert picked["qadapter"]["win_rate"] == 0.85 and picked["dpo"]["win_rate"] == 0.9
    assert frontier.retention_delta(picked["qadapter"], ["arc_easy"]) == -0.02


def test_points_are_matched_on_kl_until_generations_are_judged(tmp_path):
    def point(kl: float, d: float, win: float | None = None) -> dict:
        return {"knob": {}, "win_rate": win, "kl_to_base": kl, "pref_accuracy": 0.7, "retention": {"arc_easy": {"delta": d, "delta_ci": [d - 0.01, d + 0.01], "mcnemar_p": 0.5}}}

    setting = {"benchmarks": ["arc_easy"], "methods": {"dpo": {"points": [point(0.4, -0.04)]}, "qadapter": {"points": [point(0.02, 0.0), point(0.37, -0.03)]}}}
    assert frontier.alignment_axis(setting) == "kl_to_base"
    assert frontier.matched(setting)["qadapter"]["kl_to_base"] == 0.37
    text = frontier.markdown({"settings": {"s": setting}})
    assert "At matched KL to base (judged win rates pending" in text and "| qadapter | — | 0.370 | -3.00 |" in text
    setting["methods"]["qadapter"]["points"][1]["knob"] = {"train_temperature": 0.1, "alpha_0": 0.1}
    assert [name for name, _ in frontier._curves(setting)] == ["dpo", "qadapter", "qadapter (a = 0.1)"]  # one curve per trained adapter
    frontier.plot(setting, tmp_path / "f.png", "s")
    assert (tmp_path / "f.png").stat().st_size > 0
    setting["methods"]["qadapter"]["points"][0]["win_rate"] = 0.9  # one judged point switches the whole setting to win rate
    assert frontier.alignment_axis(setting) == "win_rate"
