"""Hostile input: broken data files, over-long prompts, random records, tampered or mismatched adapters.

Every case ends in a qadapter error whose message names the file (and line), or in a counted skip;
never in a traceback from inside json, gzip, tokenizers, jinja, safetensors or PEFT.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS, build_tokenizer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qadapter.collate import tokenize_pair
from qadapter.config import QAdapterConfig
from qadapter.data import MAX_RECORD_CHARS, ROLES, PreferenceRecord, parse_record, read_records
from qadapter.errors import ConfigError, DataError, ModelError
from qadapter.model import QAdapterModel, load_base
from qadapter.collate import tokenize_records


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD = {"prompt": "tell me about the cat", "chosen": "the cat sat", "rejected": "the dog ran"}
GOOD_LINE = json.dumps(GOOD).encode()


def _line(obj) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------
# 1. Broken data files, one bad record among good ones

HH_A = "\n\nHuman: why\n\nAssistant: yes"
BAD_RECORDS = {
    # malformed JSON
    "invalid-json": (b'{"prompt": "a", "chosen": ', "invalid JSON"),
    "nul-byte-in-string": (b'{"prompt": "a\x00", "chosen": "b", "rejected": "c"}', "invalid JSON"),
    "nested-too-deep": (b"[" * 100_000, "invalid JSON"),
    "integer-too-long": (b'{"prompt": "a", "chosen": "b", "rejected": "c", "n": ' + b"7" * 5000 + b"}", "invalid JSON"),
    "non-utf8": (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not UTF-8 text"),
    "unpaired-surrogate": (b'{"prompt": "a \\ud800", "chosen": "b", "rejected": "c"}', "unpaired surrogate"),
    # not an object
    "json-array": (b"[1, 2]", "a record must be a JSON object, got list"),
    "json-number": (b"42", "a record must be a JSON object, got int"),
    "json-null": (b"null", "a record must be a JSON object, got NoneType"),
    "json-string": (b'"the cat sat"', "a record must be a JSON object, got str"),
    # wrong types
    "chosen-int": ({**GOOD, "chosen": 3}, "'chosen' must be a string or a list of messages, got int"),
    "prompt-dict": ({**GOOD, "prompt": {"a": 1}}, "'prompt' must be a string or a list of messages, got dict"),
    "content-list": (
        {"prompt": [{"role": "user", "content": ["a"]}], "chosen": "b", "rejected": "c"},
        "'prompt[0]' must be an object with string 'role' and 'content'",
    ),
    "role-int": ({"prompt": [{"role": 1, "content": "a"}], "chosen": "b", "rejected": "c"}, "'prompt[0]' must be an object"),
    "score-nan": (b'{"text": ["' + HH_A.encode("unicode_escape") + b'", "x"], "score": [NaN, 1]}', "two different numbers"),
    "score-bool": ({"text": [HH_A, HH_A + "!"], "score": [True, False]}, "two different numbers"),
    "responses-not-object": ({"query": "q", "responses": ["a", "b"]}, "'responses' must be an object"),
    # missing fields
    "missing-rejected": ({"prompt": "a", "chosen": "b"}, "unrecognised record with fields ['chosen', 'prompt']"),
    "empty-object": ({}, "unrecognised record with fields []"),
    "plain-pair-without-prompt": ({"chosen": "yes", "rejected": "no"}, "plain text without an explicit 'prompt'"),
    # empty or whitespace-only
    "empty-prompt": ({**GOOD, "prompt": ""}, "'prompt' is empty"),
    "whitespace-rejected": ({**GOOD, "rejected": " \t\n "}, "'rejected' is empty"),
    "empty-message-list": ({**GOOD, "prompt": []}, "'prompt' must be a non-empty list of messages"),
    "blank-assistant-turn": (
        {"prompt": [user("a")], "chosen": [assistant("  ")], "rejected": [assistant("no")]},
        "the chosen response is empty",
    ),
    # chosen == rejected
    "identical-plain": ({**GOOD, "rejected": GOOD["chosen"]}, "chosen and rejected are identical"),
    "identical-conversation": (
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
        "chosen and rejected are identical",
    ),
    "identical-hh": ({"chosen": HH_A, "rejected": HH_A}, "chosen and rejected are identical"),
    # conversational structure
    "bad-role": ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"}, "has role 'robot'"),
    "prompt-ends-with-assistant": (
        {"prompt": [user("a"), assistant("b")], "chosen": "c", "rejected": "d"},
        "the prompt must end with a user turn, not 'assistant'",
    ),
    "response-starts-with-user": (
        {"prompt": [user("a")], "chosen": [user("b"), assistant("c")], "rejected": [assistant("d")]},
        "'chosen' must start with an assistant turn, not 'user'",
    ),
    "implicit-prompt-ends-with-assistant": (
        {"chosen": [user("a"), assistant("b"), assistant("c")], "rejected": [user("a"), assistant("b"), assistant("d")]},
        "must end with a user turn",
    ),
}


@pytest.mark.parametrize("bad, message", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_jsonl_record_names_file_and_line_or_is_skipped(tmp_path, bad, message):
    """A bad line 2 raises DataError 'path:2: reason'; with skip_invalid it alone is skipped and counted."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD_LINE, _line(bad), GOOD_LINE]) + b"\n")
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)
    report = read_records(path, skip_invalid=True)
    assert [r.origin for r in report.records] == [f"{path}:1", f"{path}:3"]
    assert len(report.skipped) == 1 and report.skipped[0] == str(info.value)


OBJECT_RECORDS = {k: v for k, v in BAD_RECORDS.items() if not isinstance(v[0], bytes)}  # expressible in a .json list


@pytest.mark.parametrize("bad, message", OBJECT_RECORDS.values(), ids=OBJECT_RECORDS.keys())
def test_bad_record_in_json_list_names_index_or_is_skipped(tmp_path, bad, message):
    """In a .json list the bad record is named 'path[1]'; skip_invalid drops it and keeps the others."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, bad, GOOD]), encoding="utf-8")
    with pytest.raises(DataError, match=r"^" + str(path).replace("\\", "\\\\") + r"\[1\]: ") as info:
        read_records(path)
    assert message in str(info.value)
    report = read_records(path, skip_invalid=True)
    assert [r.origin for r in report.records] == [f"{path}[0]", f"{path}[2]"]
    assert report.skipped == [str(info.value)]


def _corrupt_deflate() -> bytes:
    """A gzip stream with a damaged compressed body: zlib fails in the middle of reading."""
    data = bytearray(gzip.compress(GOOD_LINE * 2000 + b"\n", mtime=0))
    data[10] ^= 0xFF  # first byte after the 10-byte gzip header
    return bytes(data)


# name: (file name, content, message after "path" in both modes)
BROKEN_FILES = {
    "empty-jsonl": ("d.jsonl", b"", ": no usable preference records"),
    "blank-lines-only": ("d.jsonl", b"\n  \n\t\n", ": no usable preference records"),
    "empty-json": ("d.json", b"", ":1: invalid JSON"),
    "json-number": ("d.json", b"42", ": expected a JSON list of records"),
    "json-data-not-list": ("d.json", b'{"data": 5}', ": expected a JSON list of records"),
    "json-nested-too-deep": ("d.json", b"[" * 100_000, ": invalid JSON"),
    "json-non-utf8": ("d.json", b'[{"prompt": "caf\xe9"}]', ": not UTF-8 text"),
    "json-gz-not-gzip": ("d.json.gz", b'[{"prompt": "a"}]', ": broken gzip file"),
    "jsonl-gz-not-gzip": ("d.jsonl.gz", GOOD_LINE, ": broken gzip file"),
    "jsonl-gz-corrupt-body": ("d.jsonl.gz", _corrupt_deflate(), ": broken gzip file"),
}


@pytest.mark.parametrize("name, content, message", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_broken_file_raises_data_error_in_both_modes(tmp_path, name, content, message):
    """A file that holds no readable records raises DataError naming it, skip_invalid or not."""
    path = tmp_path / name
    path.write_bytes(content)
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            read_records(path, skip_invalid=skip)
        assert str(info.value).startswith(f"{path}{message}")


def test_nothing_usable_left_raises_with_count(tmp_path):
    """When every line is bad, skip_invalid still raises DataError, with the number skipped."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(_line(BAD_RECORDS[k][0]) for k in ("invalid-json", "json-null", "chosen-int", "non-utf8")) + b"\n")
    with pytest.raises(DataError, match=r"no usable preference records \(4 skipped\)$") as info:
        read_records(path, skip_invalid=True)
    assert str(info.value).startswith(f"{path}: ")


def test_huge_record_loads_and_is_truncated(tmp_path, tok):
    """A valid response just under the per-record bound loads like any record; tokenize_pair cuts it to max_length tokens.
    (Records over MAX_RECORD_CHARS are refused with their line: tests/test_hostile_data.py.)"""
    chunk = "the cat sat on the mat " + "z" * 4000 + " "
    huge = chunk * ((MAX_RECORD_CHARS - 1000) // len(chunk))
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD_LINE, _line({**GOOD, "chosen": huge}), GOOD_LINE]) + b"\n")
    assert path.stat().st_size > 0.9 * MAX_RECORD_CHARS
    report = read_records(path)
    assert len(report.records) == 3 and not report.skipped
    rec = report.records[1]
    assert rec.chosen == huge
    pair = tokenize_pair(rec, tok, max_length=64, max_prompt_length=16)
    assert len(pair.prompt) + len(pair.chosen) == 64  # the short prompt is kept whole, the response cut
    assert pair.prompt == tuple(tok(GOOD["prompt"])["input_ids"])
    assert pair.chosen[:6] == tuple(tok("the cat sat on the mat", add_special_tokens=False)["input_ids"])
    assert len(pair.prompt) + len(pair.rejected) <= 64


# ---------------------------------------------------------------------------------------------
# 2. Prompts longer than the limit, through tokenize_records


def _ids(tok, text):
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def test_long_prompts_keep_responses_and_identical_pairs_are_skipped(tok):
    """Far-too-long prompts lose tokens from the left; pairs that become identical are skipped and reported."""
    config = QAdapterConfig(max_length=32, max_prompt_length=8)
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(600))
    shared = " ".join(["the cat sat on the mat"] * 8)  # 48 tokens: longer than the response budget
    records = [
        PreferenceRecord([user(long_prompt)], [assistant("the cat sat")], [assistant("the dog ran on the log")], "f:1"),
        PreferenceRecord(long_prompt, "yes it is good", "no", "f:2"),
        PreferenceRecord([user("why")], [assistant(shared + " good")], [assistant(shared + " bad")], "f:3"),
        PreferenceRecord(long_prompt, shared + " good", shared + " bad", "f:4"),
    ]
    pairs, skipped = tokenize_records(records, tok, config.max_length, config.max_prompt_length)
    assert [p.origin for p in pairs] == ["f:1", "f:2"]
    assert skipped == [
        "f:3: chosen and rejected are identical after truncation to 32 tokens",
        "f:4: chosen and rejected are identical after truncation to 32 tokens",
    ]
    conv, plain = pairs
    full_prompt = _ids(tok, tok.apply_chat_template(records[0].prompt, tokenize=False, add_generation_prompt=True))
    assert len(full_prompt) > 600
    assert conv.prompt == full_prompt[-len(conv.prompt) :]  # cut from the left: the generation prompt survives
    assert conv.chosen == _ids(tok, "the cat sat <|im_end|>")
    assert conv.rejected == _ids(tok, "the dog ran on the log <|im_end|>")
    assert len(conv.prompt) + len(conv.rejected) == 32
    assert plain.prompt == _ids(tok, long_prompt)[-len(plain.prompt) :]  # BOS and the start are gone
    assert plain.chosen == _ids(tok, "yes it is good <|im_end|>") and plain.rejected == _ids(tok, "no <|im_end|>")
    assert len(plain.prompt) + len(plain.chosen) == 32


def test_chat_template_refusing_a_conversation_is_skipped(tok):
    """A chat template that raise_exception()s on a role yields a counted skip, not a jinja traceback."""
    strict = build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}"
        + tok.chat_template[len("{% for m in messages %}") :]
    )
    records = [
        PreferenceRecord([user("why"), {"role": "tool", "content": "the cat"}], [assistant("yes")], [assistant("no")], "f:1"),
        PreferenceRecord([user("why")], [assistant("yes")], [assistant("no")], "f:2"),
    ]
    pairs, skipped = tokenize_records(records, strict, QAdapterConfig().max_length, QAdapterConfig().max_prompt_length)
    assert [p.origin for p in pairs] == ["f:2"]
    assert len(skipped) == 1 and skipped[0].startswith("f:1: the chat template refuses this conversation")
    assert "tool turns are not supported" in skipped[0]


def test_training_with_no_usable_pair_is_a_data_error(tiny_model_dir, tmp_path):
    """If truncation leaves no usable training pair, train() stops with a DataError naming the reasons."""
    from qadapter.training import train

    shared = " ".join(["the cat sat on the mat"] * 8)
    records = [PreferenceRecord("why", shared + " good", shared + " bad", f"f:{i}") for i in range(4)]
    config = QAdapterConfig(max_length=16, max_prompt_length=4, batch_size=2, micro_batch_size=2)
    with pytest.raises(DataError, match=r"^no training pair survived tokenization: f:0: chosen and rejected are identical"):
        train(config, records, records, tmp_path / "run", model=str(tiny_model_dir), progress=False, log=lambda s: None)


# ---------------------------------------------------------------------------------------------
# 3. Properties

KEYS = ["prompt", "chosen", "rejected", "text", "score", "query", "responses"]
HH_B = "\n\nHuman: why\n\nAssistant: no \ud800"
ODD_TEXT = ["", " ", "\n", "\ud800", "\x00", "caf\u00e9", HH_A, HH_B, HH_A + "\n\nHuman: and", "\n\nAssistant: x", "Human: a"]


def _mostly(good, bad):
    """``good`` about four times in five: mostly valid records get past layout detection into the later checks."""
    return st.one_of(good, good, good, good, bad)


words_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)
texts = _mostly(words_text, st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=12)))
# huge ints overflow float(); NaN, inf and booleans order nothing
numbers = _mostly(st.integers(-3, 3), st.one_of(st.floats(), st.sampled_from([10**4000, -(10**4000), True, False])))
scalars = st.one_of(st.none(), numbers, texts)


def _turn(roles):
    return st.builds(lambda role, content: {"role": role, "content": content}, st.sampled_from(roles), texts)


message = _mostly(
    _turn(list(ROLES)),
    st.one_of(
        _turn(["robot", "Human", ""]),
        st.dictionaries(st.sampled_from(["role", "content", "name"]), st.one_of(scalars, st.lists(scalars, max_size=2)), max_size=3),
        scalars,
    ),
)
messages = st.lists(message, max_size=3)
valid_turns = st.lists(_turn(list(ROLES)), max_size=2)
prompts = st.builds(lambda before, last: before + [last], valid_turns, _turn(["user", "user", "tool", "assistant", "system"]))
responses = st.builds(lambda first, rest: [first] + rest, _turn(["assistant", "assistant", "assistant", "user"]), valid_turns)
turns = _mostly(st.one_of(texts, prompts, responses), st.one_of(messages, scalars))  # prompt, chosen, rejected or query
layouts = st.one_of(
    st.fixed_dictionaries({"prompt": turns, "chosen": turns, "rejected": turns}),
    st.fixed_dictionaries({"prompt": prompts, "chosen": st.one_of(responses, texts), "rejected": st.one_of(responses, texts)}),
    st.fixed_dictionaries({"chosen": turns, "rejected": turns}),
    st.builds(lambda shared, a, b: {"chosen": shared + a, "rejected": shared + b}, prompts, responses, responses),
    st.fixed_dictionaries(
        {"text": _mostly(st.lists(st.one_of(texts, st.builds(list.__add__, prompts, responses)), min_size=2, max_size=2), turns)},
        optional={"score": _mostly(st.lists(numbers, min_size=2, max_size=2), scalars)},
    ),
    st.fixed_dictionaries(
        {"query": turns, "responses": _mostly(st.dictionaries(st.sampled_from(["a", "b", "concise", ""]), turns, max_size=3), scalars)}
    ),
)
anything = st.dictionaries(st.sampled_from(KEYS), st.one_of(turns, st.lists(turns, max_size=3)), max_size=7)
records = _mostly(
    st.one_of(layouts, st.builds(lambda extra, rec: {**extra, **rec}, anything, layouts)),
    st.one_of(anything, scalars, st.lists(scalars, max_size=3)),
)


def _check_parsed(parsed, origin):
    assert isinstance(parsed, list)
    for rec in parsed:
        assert isinstance(rec, PreferenceRecord) and rec.origin == origin
        assert rec.chosen != rec.rejected
        kinds = {isinstance(rec.prompt, list), isinstance(rec.chosen, list), isinstance(rec.rejected, list)}
        assert len(kinds) == 1  # all text or all conversation
        if rec.conversational:
            assert rec.prompt[-1]["role"] in ("user", "tool")
            assert all(set(m) == {"role", "content"} and m["role"] in ROLES for m in rec.prompt + rec.chosen + rec.rejected)
        json.dumps([rec.prompt, rec.chosen, rec.rejected], ensure_ascii=False).encode("utf-8")  # tokenizable, hashable


@settings(max_examples=400, deadline=None, database=None)
@given(obj=records, prefer=st.sampled_from([None, "a", "b", "concise"]))
@example(obj={"text": [HH_A, HH_B], "score": [1, 0]}, prefer=None)  # a surrogate in the rejected response
@example(obj={"text": [HH_A, HH_A + "!"], "score": [10**4000, 0]}, prefer=None)  # float() overflows; still ordered
@example(obj={"prompt": [user("a"), assistant("b")], "chosen": "c", "rejected": "d"}, prefer=None)
def test_parse_record_property(obj, prefer):
    """parse_record returns well-formed PreferenceRecords or raises DataError starting 'x:1: ', nothing else."""
    try:
        parsed = parse_record(obj, "x:1", prefer=prefer)
    except DataError as exc:
        assert str(exc).startswith("x:1: ")
    else:
        _check_parsed(parsed, "x:1")


garbage_lines = st.sampled_from(
    [b"{", b"null", b"[1]", b"\xff\xfe", b"[" * 5000, b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}']
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), garbage_lines, st.just(GOOD_LINE)), max_size=8))
def test_read_records_property(lines):
    """Reading a .jsonl of random lines with skip_invalid: every line is kept or skipped exactly once, or DataError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            report = read_records(path, prefer="a", skip_invalid=True)
        except DataError as exc:
            assert str(exc).startswith(f"{path}: no usable preference records")
            return
        kept = {r.origin for r in report.records}
        skipped = [s.split(": ", 1)[0] for s in report.skipped]
        assert len(skipped) == len(set(skipped)) and not kept & set(skipped)
        assert kept | set(skipped) == {f"{path}:{i}" for i, line in enumerate(lines, start=1) if line.strip()}
        for rec in report.records:
            _check_parsed([rec], rec.origin)


sentences = st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(" ".join)
# a valid history: an optional system turn, then user/assistant exchanges (the question follows as a user turn)
chat_history = st.builds(
    lambda system, exchanges: ([{"role": "system", "content": system}] if system else [])
    + [{"role": role, "content": text} for exchange in exchanges for role, text in zip(("user", "assistant"), exchange)],
    st.one_of(st.none(), sentences),
    st.lists(st.tuples(sentences, sentences), max_size=2),
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    history=chat_history,
    question=sentences,
    chosen=sentences,
    rejected=sentences,
    data=st.data(),
)
def test_tokenize_pair_property(tok, history, question, chosen, rejected, data):
    """Any valid conversation: both sequences fit max_length and continue one prompt (a left-cut suffix of the full one)."""
    obj = {"prompt": history + [user(question)], "chosen": chosen, "rejected": rejected}
    try:
        [rec] = parse_record(obj, "x:1")
    except DataError as exc:
        assert chosen == rejected and str(exc) == "x:1: chosen and rejected are identical"
        return
    max_length = data.draw(st.integers(2, 96), label="max_length")
    max_prompt_length = data.draw(st.integers(1, max_length - 1), label="max_prompt_length")
    try:
        pair = tokenize_pair(rec, tok, max_length, max_prompt_length)
    except DataError as exc:
        assert str(exc).startswith("x:1: chosen and rejected are identical after truncation")
        return
    prompt_text = tok.apply_chat_template(rec.prompt, tokenize=False, add_generation_prompt=True)
    full_prompt = _ids(tok, prompt_text)
    assert 1 <= len(pair.prompt) and pair.prompt == full_prompt[len(full_prompt) - len(pair.prompt) :]
    for response, continuation in ((pair.chosen, rec.chosen), (pair.rejected, rec.rejected)):
        assert 1 <= len(response) and len(pair.prompt) + len(response) <= max_length
        full = _ids(tok, tok.apply_chat_template(rec.prompt + continuation, tokenize=False))
        assert response == full[len(full_prompt) : len(full_prompt) + len(response)]  # a prefix of the real continuation


# ---------------------------------------------------------------------------------------------
# 4. Adapters: safetensors only; tampered or mismatched adapters are refused


@pytest.fixture(scope="module")
def saved_adapter(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-adapter") / "adapter"
    QAdapterModel.create(load_base(str(tiny_model_dir), device="cpu"), QAdapterConfig()).save_pretrained(folder)
    return folder


@pytest.fixture()
def adapter(saved_adapter, tmp_path):
    """A fresh copy of the saved adapter, to tamper with."""
    return Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))


def _load(adapter_dir, model_dir):
    return QAdapterModel.from_pretrained(adapter_dir, base=load_base(str(model_dir), device="cpu"))


class _CreatesFileWhenUnpickled:
    """A pickle payload: loading it creates ``path``, proving the file was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_pickled_weights_are_never_loaded(adapter, tiny_model_dir, tmp_path):
    """adapter_model.bin instead of safetensors is refused, and never unpickled."""
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors is missing \(only safetensors adapters are loaded\)"):
        _load(adapter, tiny_model_dir)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(adapter, tiny_model_dir, tmp_path):
    """With both files present the safetensors weights load and the .bin is never unpickled."""
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    assert _load(adapter, tiny_model_dir).config == QAdapterConfig()
    assert not marker.exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p.write_bytes(b"\x00garbage" * 64),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"\xff" * 8 + b"{}"),
        _truncate,
    ],
    ids=["garbage", "empty", "huge-header-length", "truncated"],
)
def test_corrupt_safetensors_is_refused(adapter, tiny_model_dir, tamper):
    """A damaged adapter_model.safetensors gives ModelError naming the file, not a SafetensorError."""
    path = adapter / "adapter_model.safetensors"
    tamper(path)
    with pytest.raises(ModelError, match=r"^" + str(path).replace("\\", "\\\\") + r": not a valid safetensors file \("):
        _load(adapter, tiny_model_dir)


def _tensors(change):
    """A tamper that rewrites adapter_model.safetensors with ``change`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    return lambda adapter: save_file(change(load_file(adapter / "adapter_model.safetensors")), adapter / "adapter_model.safetensors")


def _peft_config(change):
    return lambda adapter: _edit_json(adapter / "adapter_config.json", change)


Q_PROJ_0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_peft_config(lambda c: c.update(r=4)), r"lora_A\.weight' has shape \[8, 64\], expected \[4, 64\] for rank r=4"),
        (_tensors(lambda t: {k: v[:, :8].contiguous() for k, v in t.items()}), "has shape"),
        (_tensors(lambda t: {k + ".x": v for k, v in t.items()}), "is not a LoRA weight of a module of the base model"),
        (_tensors(lambda t: dict(list(t.items())[1:])), "lacks 1 of the 8 tensors"),
        (_tensors(lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}), "NaN or infinite"),
    ],
    ids=["rank-8-to-4", "tensor-shapes", "renamed-tensors", "missing-tensor", "nan-weights"],
)
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT's warning; the ModelError is what counts
def test_mismatched_adapter_weights_are_refused(adapter, tiny_model_dir, tamper, message):
    """Weights that do not match adapter_config.json (rank, shapes, names, values) give a one-line ModelError."""
    tamper(adapter)
    with pytest.raises(ModelError, match=message) as info:
        _load(adapter, tiny_model_dir)
    assert str(info.value).startswith(str(adapter)) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "extra",
    [
        {f"{Q_PROJ_0}.base_layer.weight": torch.zeros(64, 64)},  # a targeted layer's own base weight
        {"base_model.model.model.norm.weight": torch.zeros(64)},  # a layer no adapter touches
    ],
    ids=["targeted-base-weight", "untargeted-base-weight"],
)
def test_adapter_cannot_overwrite_base_weights(adapter, tiny_model_dir, extra):
    """PEFT loads any base weight it finds in the adapter file; only LoRA factors are accepted, so the base stays intact."""
    _tensors(lambda t: {**t, **extra})(adapter)
    (key,) = extra
    with pytest.raises(ModelError, match=f"tensor '{key}' is not a LoRA weight of a module of the base model"):
        _load(adapter, tiny_model_dir)


def _remove(key):
    return lambda c: c.pop(key)


# name: (change to adapter_config.json, the message after "path: ")
HOSTILE_PEFT_CONFIGS = {
    "regex-targets": (dict(target_modules="(.*)*.*X"), "field 'target_modules' must be a list of module names or 'all-linear'"),
    "regex-in-list": (dict(target_modules=["q_proj", "(.*)*.*X"]), "field 'target_modules' must be a list of module names"),
    "targets-not-list": (dict(target_modules=5), "field 'target_modules' must be"),
    "empty-targets": (dict(target_modules=[]), "field 'target_modules' must be"),
    "unknown-target": (dict(target_modules=["no_such_proj"]), "field 'target_modules' names no module of the base model: 'no_such_proj'"),
    "huge-rank": (dict(r=1_000_000), "field 'r' must be >= 1 and <= 65536, got 1000000"),
    "rank-above-hidden-size": (dict(r=65), "field 'r' must be <= the base model's hidden size (64), got 65"),
    "rank-zero": (dict(r=0), "field 'r' must be >= 1"),
    "rank-bool": (dict(r=True), "field 'r' must be an integer, got True"),
    "rank-not-int": (dict(r="eight"), "field 'r' must be an integer, got 'eight'"),
    "rank-float": (dict(r=8.5), "field 'r' must be an integer"),
    "alpha-inf": (dict(lora_alpha=float("inf")), "field 'lora_alpha' must be > 0 and <= 10000, got inf"),
    "alpha-nan": (dict(lora_alpha=float("nan")), "field 'lora_alpha' must be > 0"),
    "alpha-negative": (dict(lora_alpha=-16), "field 'lora_alpha' must be > 0"),
    "alpha-bool": (dict(lora_alpha=True), "field 'lora_alpha' must be a number, got True"),
    "dropout-one": (dict(lora_dropout=1.0), "field 'lora_dropout' must be >= 0 and < 1"),
    "layers-out-of-range": (dict(layers_to_transform=[0, 7]), "field 'layers_to_transform' must name layers below 2, got 7"),
    "layers-negative": (dict(layers_to_transform=-1), "field 'layers_to_transform' must be a layer index"),
    "layers-pattern": (dict(layers_pattern="(.*)*"), "field 'layers_pattern' is not supported in a Q-Adapter"),
    "modules-to-save": (dict(modules_to_save=["no_such_module"]), "field 'modules_to_save' is not supported in a Q-Adapter"),
    "modules-to-save-real": (dict(modules_to_save=["lm_head"]), "field 'modules_to_save' is not supported in a Q-Adapter"),
    "rank-pattern": (dict(rank_pattern={"(.*)*.*X": 4096}), "field 'rank_pattern' is not supported in a Q-Adapter"),
    "exclude-regex": (dict(exclude_modules="(.*)*.*X"), "field 'exclude_modules' is not supported in a Q-Adapter"),
    "pissa-init": (dict(init_lora_weights="pissa"), "field 'init_lora_weights' must be true or false"),
    "dora": (dict(use_dora=True), "field 'use_dora' is not supported in a Q-Adapter"),
    "lora-bias": (dict(bias="all"), "field 'bias' must be 'none'"),
    "unknown-key": (dict(colour="red"), "field 'colour' is not supported in a Q-Adapter (it must be unset, got 'red')"),
    "other-peft-type": (dict(peft_type="LOHA"), "field 'peft_type' must be 'LORA'"),
    "other-task": (dict(task_type="SEQ_CLS"), "field 'task_type' must be 'CAUSAL_LM'"),
    "missing-rank": (_remove("r"), "field 'r' is missing"),
}


@pytest.mark.parametrize("change, message", HOSTILE_PEFT_CONFIGS.values(), ids=HOSTILE_PEFT_CONFIGS.keys())
def test_hostile_peft_config_is_refused_before_peft(adapter, tiny_model_dir, change, message):
    """adapter_config.json is checked against the schema and the base's dimensions before PEFT sees it:
    a ConfigError naming the file and the field, on one line, and no LoRA layer is ever built."""
    path = adapter / "adapter_config.json"
    _edit_json(path, change if callable(change) else lambda c: c.update(change))
    base = load_base(str(tiny_model_dir), device="cpu")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        QAdapterModel.from_pretrained(adapter, base=base)
    assert time.monotonic() - started < 30  # a regex PEFT ran would backtrack for minutes
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
    assert not any("lora_" in name for name, _ in base.model.named_modules())  # PEFT builds its layers in the base


def test_schema_accepts_what_peft_writes_and_all_linear(saved_adapter):
    """The adapter_config.json PEFT writes passes as it is, and the string target 'all-linear' is no regex."""
    from qadapter.adapter_schema import check_peft_config

    path = saved_adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    assert check_peft_config(data, path) == data
    assert check_peft_config({**data, "target_modules": "all-linear"}, path)["target_modules"] == "all-linear"


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


def _set_in(section, key, value):
    return lambda meta: meta[section].__setitem__(key, value)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: p.write_text("{not json"), "not a valid Q-Adapter config"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not a valid Q-Adapter config"),
        (lambda p: p.write_text("[]"), "a Q-Adapter config must be a JSON object, got list"),
        (lambda p: _edit_json(p, lambda m: m.pop("base")), "field 'base' is missing or not an object"),
        (lambda p: _edit_json(p, _set("config", "alpha_0=1")), "field 'config' is missing or not an object"),
        (lambda p: _edit_json(p, _set_in("config", "colour", "red")), "unknown field(s) colour"),
        (lambda p: _edit_json(p, _set_in("config", "alpha_0", -1)), "alpha_0 must be > 0 and <= 10000, got -1"),
        (lambda p: _edit_json(p, _set_in("config", "alpha_0", "big")), "alpha_0 must be a number, got 'big'"),
        (lambda p: _edit_json(p, _set_in("config", "alpha_0", float("inf"))), "alpha_0 must be > 0 and <= 10000, got inf"),
        (lambda p: _edit_json(p, _set_in("config", "alpha_0", True)), "alpha_0 must be a number, got True"),
        (lambda p: _edit_json(p, _set_in("config", "alpha_tilde", float("nan"))), "alpha_tilde must be > 0 and <= 10000, got nan"),
        (lambda p: _edit_json(p, _set_in("config", "target_modules", "(.*)*.*X")), "target_modules must be a list of 1 to 1024 module names"),
        (lambda p: _edit_json(p, lambda m: m["base"].pop("fingerprint")), "malformed 'base'"),
        (lambda p: _edit_json(p, _set_in("base", "fingerprint", "abc")), "malformed 'base' (wrong type or empty: fingerprint)"),
        (lambda p: _edit_json(p, _set_in("base", "fingerprint", [0.1, 0.2])), "(fingerprint has 2 values, expected 24)"),
        (lambda p: _edit_json(p, _set_in("base", "architecture", [1])), "malformed 'base' (wrong type or empty: architecture)"),
    ],
    ids=[
        "invalid-json", "non-utf8", "not-an-object", "missing-base", "config-not-object", "unknown-field",
        "alpha_0-negative", "alpha_0-string", "alpha_0-inf", "alpha_0-true", "alpha_tilde-nan", "targets-regex", "base-missing-field", "fingerprint-string", "fingerprint-length", "architecture-list",
    ],
)
def test_corrupt_qadapter_config_is_a_config_error(adapter, tiny_model_dir, tamper, message):
    """A broken qadapter_config.json gives ConfigError starting with its path and naming the field."""
    path = adapter / "qadapter_config.json"
    tamper(path)
    with pytest.raises(ConfigError) as info:
        _load(adapter, tiny_model_dir)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: p.write_text("{not json"), "not a valid PEFT adapter config"),
        (lambda p: p.write_text("[]"), "a PEFT adapter config must be a JSON object"),
        (lambda p: p.unlink(), "no such PEFT adapter config"),
    ],
    ids=["invalid-json", "not-an-object", "missing"],
)
def test_corrupt_peft_config_is_a_config_error(adapter, tiny_model_dir, tamper, message):
    """A broken adapter_config.json gives ConfigError naming it, not a PEFT traceback."""
    path = adapter / "adapter_config.json"
    tamper(path)
    with pytest.raises(ConfigError) as info:
        _load(adapter, tiny_model_dir)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory):
    """A tiny Llama with another hidden size: same tokenizer, different architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-wider")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_other_architecture_is_refused_even_when_mismatch_is_allowed(saved_adapter, wider_model_dir):
    """A base of another shape is refused by name; forcing it still ends in ModelError, not a PEFT traceback."""
    with pytest.raises(ModelError, match=r"different base model .*hidden_size: adapter expects 64, base has 32"):
        _load(saved_adapter, wider_model_dir)
    with pytest.raises(ModelError, match=r"lora_A\.weight' has shape \[8, 64\], expected \[8, 32\]"):
        QAdapterModel.from_pretrained(saved_adapter, base=load_base(str(wider_model_dir), device="cpu"), allow_base_mismatch=True)


def test_other_weights_are_refused(saved_adapter, other_model_dir):
    """The same architecture with other weights (other_model_dir) is refused with ModelError."""
    with pytest.raises(ModelError, match=r"^" + str(saved_adapter).replace("\\", "\\\\") + " was trained on a different base model"):
        _load(saved_adapter, other_model_dir)
