"""Data a careless user or an attacker hands qadapter: wrong turn order, empty conversational
prompts, paths that are not files, names that only look like hub ids."""

from __future__ import annotations

import os

import pytest

from qadapter import data as data_module
from qadapter.data import parse_record, read_records
from qadapter.errors import DataError

USER, ASSISTANT, SYSTEM, TOOL = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "yo"), ("system", "be nice"), ("tool", "42")))


@pytest.mark.parametrize(
    "prompt,message",
    [
        ([USER, USER], "two user turns in a row"),
        ([ASSISTANT, USER], "must open with a user turn"),
        ([USER, ASSISTANT, ASSISTANT, USER], "two assistant turns in a row"),
        ([USER, SYSTEM, USER], "only the first turn may be a system turn"),
        ([USER, TOOL], "tool turn at position 1 that does not follow an assistant turn"),
        ([{"role": "user", "content": " \n\t"}], "the prompt is empty"),
        ([SYSTEM, {"role": "user", "content": "  "}], "the prompt is empty"),
    ],
)
def test_conversational_prompts_in_a_wrong_order_or_empty_are_refused(prompt, message):
    with pytest.raises(DataError, match=f"^f.jsonl:3: .*{message}"):
        parse_record({"prompt": prompt, "chosen": "fine", "rejected": "bad"}, "f.jsonl:3")


def test_turn_order_is_checked_in_every_layout():
    with pytest.raises(DataError, match="two user turns in a row"):  # implicit prompt
        parse_record({"chosen": [USER, USER, {"role": "assistant", "content": "a"}], "rejected": [USER, USER, {"role": "assistant", "content": "b"}]}, "f:1")
    with pytest.raises(DataError, match="two user turns in a row"):  # HH transcript
        parse_record({"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d"}, "f:1")
    with pytest.raises(DataError, match="two assistant turns in a row"):  # a response that repeats the assistant
        parse_record({"prompt": [USER], "chosen": [ASSISTANT, ASSISTANT], "rejected": "no"}, "f:1")


def test_valid_orders_are_kept():
    for prompt in ([USER], [SYSTEM, USER], [USER, ASSISTANT, USER], [USER, {"role": "assistant", "content": "call"}, TOOL]):
        assert parse_record({"prompt": prompt, "chosen": "fine", "rejected": "bad"}, "f:1")[0].prompt == prompt


def test_paths_that_are_not_files_say_what_they_are(tmp_path, monkeypatch):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    os.mkfifo(tmp_path / "fifo")  # opening it would block forever
    monkeypatch.setattr(data_module, "_raw_from_datasets", lambda *a: pytest.fail("looked up on the hub"))
    for name, message in (("loop", "a symlink loop"), ("dangling", "a symlink to nothing"), ("fifo", "not a regular file")):
        with pytest.raises(DataError, match=message):
            read_records(str(tmp_path / name))


@pytest.mark.parametrize("name", ["pairs.jsonl", "./pairs", "../x/pairs", "/abs/pairs", "~/pairs", "a/b/c", "runs/pairs"])
def test_only_hub_like_names_go_to_datasets(name, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_module, "_raw_from_datasets", lambda *a: pytest.fail(f"{name} was looked up on the hub"))
    with pytest.raises(DataError, match="no such data file"):
        read_records(name)


@pytest.mark.parametrize("name", ["imdb", "trl-lib/ultrafeedback_binarized", "Anthropic/hh-rlhf"])
def test_hub_ids_go_to_datasets(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(data_module, "_raw_from_datasets", lambda source, split, config: asked.append(source) or iter(()))
    with pytest.raises(DataError, match="no usable preference records"):  # the stub yields none
        read_records(name)
    assert asked == [name]


def test_a_huge_record_is_refused_before_tokenization(tmp_path):
    """A 200 MB record once drove the tokenizer past 12 GB: over 1M characters a record is refused by line."""
    from qadapter.data import MAX_RECORD_CHARS

    path = tmp_path / "big.jsonl"
    rows = [{"prompt": "hi", "chosen": "good", "rejected": "bad"}, {"prompt": "hi", "chosen": "x" * MAX_RECORD_CHARS, "rejected": "bad"}]
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl:2: the record holds 1,000,0\d\d characters, more than the 1,000,000"):
        read_records(path)
    assert len(read_records(path, skip_invalid=True).records) == 1
