"""The TRL-trained peers on the tiny model: saved as adapter folders whose customized policy (α₀ = α̃ = 1)
is the trained model itself; DPO learns the marker preference; replay mixes the requested fraction."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from qadapter import objective
from qadapter.cli import app
from qadapter.collate import collate_pairs, tokenize_pair
from qadapter.config import QAdapterConfig
from qadapter.data import read_records, split_by_prompt
from qadapter.errors import ConfigError, DataError
from qadapter.eval import baselines
from qadapter.eval.baselines import (
    BASELINE_FILE,
    ReplayRecord,
    default_replay_prompts,
    replay_count,
    replay_records,
    train_baseline,
    training_rows,
)
from qadapter.model import QAdapterModel, load_base, position_ids

from conftest import marker_records

FAST = dict(batch_size=4, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, max_length=48, max_prompt_length=24)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def records():
    return read_records(marker_records(8)).records  # 16 pairs, 8 prompts


@pytest.fixture(scope="module")
def replay_pool():
    """'General' prompts, each with a reply to reject (the role HH-RLHF plays by default)."""
    return read_records(marker_records(12, seed=7, pairs_per_prompt=1)).records


def batch_of(qmodel, records):
    pairs = [tokenize_pair(r, qmodel.tokenizer, 48, 24) for r in records]
    return collate_pairs(pairs, qmodel.tokenizer.pad_token_id)


def customized_logprobs(qmodel, ids, mask):
    """log π̃ = log softmax((Q + α₀ log π₁)/α̃) over the vocabulary, (n, T, V)."""
    q, base_logprobs = qmodel.q_and_base_logprobs(ids, mask)
    return F.log_softmax(objective.combined_logits(q, base_logprobs, qmodel.config.alpha_0, qmodel.config.alpha_tilde), -1)


@pytest.mark.parametrize("method,replay_base", [("sft", "dpo"), ("dpo", "dpo"), ("replay", "dpo"), ("replay", "sft")])
def test_saved_peer_is_the_trained_model(tiny_model_dir, records, replay_pool, tmp_path, method, replay_base):
    """2 TRL steps → an adapter folder that QAdapterModel loads, whose customized policy at α₀ = α̃ = 1
    equals softmax of the TRL-trained model's own logits; baseline.json says what produced it."""
    base = load_base(str(tiny_model_dir))
    adapter = train_baseline(
        method, records, tmp_path / "run", model=str(tiny_model_dir), config=QAdapterConfig(max_steps=2, **FAST), base=base,
        replay_base=replay_base, replay_prompts=replay_pool, replay_max_new_tokens=6, log=quiet,
    )
    info = json.loads((adapter / BASELINE_FILE).read_text())
    assert info["method"] == method and info["steps"] == 2
    assert info["environment"]["precision"] == info["precision"] and info["environment"]["versions"]["trl"] == info["trl_version"]
    assert info["trainer"] == ("SFTTrainer" if "sft" in (method, info["replay_base"]) else "DPOTrainer")
    assert info["n_task_rows"] == 16
    expected_replay = replay_count(16, 0.25) if method == "replay" else 0  # 5 of 21 rows
    assert info["n_replay_rows"] == expected_replay and info["n_rows_after_trl_filtering"] == 16 + expected_replay
    meta = json.loads((adapter / "qadapter_config.json").read_text())
    assert (meta["config"]["q_form"], meta["config"]["alpha_0"], meta["config"]["alpha_tilde"]) == ("residual", 1.0, 1.0)
    assert meta["config"]["lora_r"] == QAdapterConfig().lora_r and meta["config"]["learning_rate"] == FAST["learning_rate"]

    qmodel = QAdapterModel.from_pretrained(adapter)  # loads its own base from the recorded identity
    batch = batch_of(qmodel, records[:4])
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        policy = customized_logprobs(qmodel, ids, mask)
        base.model.eval()  # TRL attached its LoRA to this very model, in place: the trained peer
        trained = F.log_softmax(base.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float(), -1)
        _, base_logprobs = qmodel.q_and_base_logprobs(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(policy[real], trained[real], atol=1e-5, rtol=1e-5)
    assert (policy[real] - base_logprobs[real]).abs().max() > 1e-4  # training moved it: the comparison is not trivial


def implicit_margins(qmodel, records, beta):
    """DPO's implicit reward margin β·[log π/π₁ (chosen) − log π/π₁ (rejected)] per pair."""
    batch = batch_of(qmodel, records)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        policy = customized_logprobs(qmodel, ids, mask)
        _, base = qmodel.q_and_base_logprobs(ids, mask)
    taken = ids[:, 1:].unsqueeze(-1)
    ratio = (policy[:, :-1].gather(-1, taken) - base[:, :-1].gather(-1, taken)).squeeze(-1)  # (n, T-1)
    reward = beta * (ratio * batch.completion_mask[:, 1:]).sum(-1)  # (n,)
    return reward[batch.chosen_index] - reward[batch.rejected_index]


def test_dpo_learns_the_marker_preference(tiny_model_dir, records, tmp_path):
    """A few DPO steps on 'good' ≻ 'bad' make the implicit reward prefer the chosen responses (0 before)."""
    adapter = train_baseline(
        "dpo", records, tmp_path / "run", model=str(tiny_model_dir), config=QAdapterConfig(max_steps=8, **FAST), beta_dpo=0.1, log=quiet
    )
    margins = implicit_margins(QAdapterModel.from_pretrained(adapter), records, beta=0.1)
    assert margins.mean() > 0.05
    assert (margins > 0).float().mean() >= 0.75


def test_replay_records_cache_and_counts(tiny_model_dir, records, replay_pool, tmp_path, monkeypatch):
    """Replay rows: the requested share of the mixture, base responses paired with the source's rejected
    reply, cached so a rerun generates nothing and a larger n only what is missing; the base is left as it was."""
    assert (replay_count(16, 0.25), replay_count(30, 0.5), replay_count(9, 0.1)) == (5, 30, 1)
    with pytest.raises(ConfigError, match="replay_fraction"):
        replay_count(16, 1.0)
    base = load_base(str(tiny_model_dir))
    first = replay_records(base, replay_pool, 5, max_new_tokens=6, seed=0, batch_size=4, cache_dir=tmp_path)
    assert len(first) == 5 and all(r.response.strip() and r.rejected for r in first)
    where = [[p.prompt for p in replay_pool].index(r.prompt) for r in first]
    assert where == sorted(where)  # the first usable prompts, in order
    assert [r.rejected for r in first] == [replay_pool[i].rejected[0]["content"] for i in where]
    assert not any("lora" in name for name, _ in base.model.named_modules())  # the temporary LoRA is gone
    cache = list(tmp_path.glob("replay-*.jsonl"))
    assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == 8  # two whole batches of 4

    import qadapter.decode

    calls = []
    real_generate = qadapter.decode.generate
    monkeypatch.setattr(qadapter.decode, "generate", lambda *a, **k: calls.append(len(a[1])) or real_generate(*a, **k))
    again = replay_records(base, replay_pool, 5, max_new_tokens=6, seed=0, batch_size=4, cache_dir=tmp_path)
    assert again == first and calls == []  # all from the cache
    more = replay_records(base, replay_pool, 10, max_new_tokens=6, seed=0, batch_size=4, cache_dir=tmp_path)
    assert more[:5] == first and len(more) == 10 and calls == [4]  # one more batch only
    with pytest.raises(DataError, match="usable replay responses"):
        replay_records(base, replay_pool, 13, max_new_tokens=6, seed=0, batch_size=4, cache_dir=tmp_path)

    dpo_rows = training_rows("replay", records, first, "dpo")
    assert len(dpo_rows) == 21 and dpo_rows[16:] == [r.dpo_row() for r in first]
    assert dpo_rows[16]["chosen"] == [{"role": "assistant", "content": first[0].response}]
    sft_rows = training_rows("replay", records, first, "sft")
    assert len(sft_rows) == 21 and sft_rows[0] == {"prompt": records[0].prompt, "completion": records[0].chosen}
    assert sft_rows[16] == {"prompt": first[0].prompt, "completion": [{"role": "assistant", "content": first[0].response}]}
    with pytest.raises(DataError, match="no rejected reply"):
        training_rows("replay", records, [ReplayRecord([{"role": "user", "content": "hello"}], "yes")], "dpo")


def test_default_replay_prompts(records):
    """The default pool: single-turn HH-RLHF helpful-base test prompts, each with its rejected reply,
    minus the prompts given to exclude."""
    from qadapter.data import BUNDLED_DATA

    root = BUNDLED_DATA
    pool = default_replay_prompts(root)
    assert len(pool) > 500 and all(len(r.prompt) == 1 and r.prompt[0]["role"] == "user" for r in pool)
    assert len({r.prompt_key for r in pool}) == len(pool)
    fewer = default_replay_prompts(root, exclude=pool[:3])
    assert len(fewer) == len(pool) - 3 and pool[0].prompt_key not in {r.prompt_key for r in fewer}


def test_cli_baseline_replay(tiny_model_dir, replay_pool, tmp_path):
    """`qadapter baseline replay` end to end: the same split as `qadapter train`, an adapter folder that
    loads, and a second run into the same folder refused without --overwrite."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in marker_records(10)) + "\n")
    prompts = tmp_path / "general.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in marker_records(12, seed=7, pairs_per_prompt=1)) + "\n")
    out = tmp_path / "run"
    args = ["baseline", "replay", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--replay-prompts", str(prompts),
            "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "48", "--max-prompt-length", "24",
            "--replay-max-new-tokens", "6", "--replay-fraction", "0.2", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    info = json.loads((out / "adapter" / BASELINE_FILE).read_text())
    train_records, _ = split_by_prompt(read_records(str(data)).records, 0.2, seed=0)
    assert info["method"] == "replay" and info["replay_base"] == "dpo" and info["n_task_rows"] == len(train_records)
    assert info["n_replay_rows"] == replay_count(len(train_records), 0.2)
    assert QAdapterModel.from_pretrained(out / "adapter").config.alpha_0 == 1.0
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)
    assert "baseline" in runner.invoke(app, ["--help"]).output
