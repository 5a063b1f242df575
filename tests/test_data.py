"""qadapter.data: every record layout, file reading and its errors, and the split by prompt."""

from __future__ import annotations

import gzip
import json
import random
import sys

import pytest

from qadapter.data import LoadReport, PreferenceRecord, parse_hh_transcript, parse_record, read_records, split_by_prompt
from qadapter.errors import DataError, QAdapterError

from conftest import marker_records


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, lines):
    """Write raw lines (dicts are dumped as JSON, strings written as-is) one per line."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return path


GOOD = {"prompt": "tell me about the cat", "chosen": "the cat sat", "rejected": "the dog ran"}


# ---------------------------------------------------------------------------------------------
# Layouts


def test_explicit_plain_text():
    """Explicit prompt with plain strings stays plain text, with the origin attached."""
    [rec] = parse_record(dict(GOOD), "f.jsonl:1")
    assert rec == PreferenceRecord("tell me about the cat", "the cat sat", "the dog ran", "f.jsonl:1")
    assert rec.conversational is False


def test_explicit_conversational():
    """Explicit prompt with message lists keeps all three lists as given."""
    obj = {
        "prompt": [{"role": "system", "content": "be nice"}, user("hello")],
        "chosen": [assistant("hello there")],
        "rejected": [assistant("no")],
    }
    [rec] = parse_record(obj, "o")
    assert rec.prompt == [{"role": "system", "content": "be nice"}, user("hello")]
    assert rec.chosen == [assistant("hello there")]
    assert rec.rejected == [assistant("no")]
    assert rec.conversational is True


def test_explicit_conversational_drops_extra_message_keys():
    """Messages are normalised to exactly role and content."""
    obj = {"prompt": [{**user("hello"), "name": "x"}], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    [rec] = parse_record(obj, "o")
    assert rec.prompt == [user("hello")]


def test_prompt_messages_with_string_responses_become_assistant_turns():
    """A message-list prompt with string chosen/rejected wraps them as single assistant turns."""
    obj = {"prompt": [user("why")], "chosen": "because it is good", "rejected": [assistant("no")]}
    [rec] = parse_record(obj, "o")
    assert rec.prompt == [user("why")]
    assert rec.chosen == [assistant("because it is good")]
    assert rec.rejected == [assistant("no")]


def test_implicit_prompt_message_lists_split_shared_turns():
    """Implicit prompt: the shared opening turns become the prompt, the diverging rest the responses."""
    opening = [user("hello"), assistant("hello there"), user("tell me about the dog")]
    obj = {"chosen": opening + [assistant("the dog ran")], "rejected": opening + [assistant("no")]}
    [rec] = parse_record(obj, "o")
    assert rec.prompt == opening
    assert rec.chosen == [assistant("the dog ran")]
    assert rec.rejected == [assistant("no")]


@pytest.mark.parametrize(
    "chosen, rejected, message",
    [
        ([user("a")], [user("b")], "share no opening turn"),
        ([user("a"), assistant("b"), assistant("c")], [user("a"), assistant("b"), assistant("d")], "must end with a user turn"),
        ([user("a"), user("b")], [user("a"), assistant("c")], "must start with an assistant turn"),
        ([user("a"), assistant("  ")], [user("a"), assistant("c")], "the chosen response is empty"),
        ([user("a"), assistant("c")], [user("a"), assistant("")], "the rejected response is empty"),
    ],
)
def test_implicit_prompt_invalid_structures(chosen, rejected, message):
    """Implicit-prompt pairs that cannot be split into prompt + assistant responses raise DataError."""
    with pytest.raises(DataError, match=message):
        parse_record({"chosen": chosen, "rejected": rejected}, "o")


def test_hh_transcript_single_turn():
    """An HH-RLHF pair: the Human turn is the prompt, roles become user/assistant."""
    obj = {"chosen": "\n\nHuman: why\n\nAssistant: it is good", "rejected": "\n\nHuman: why\n\nAssistant: no"}
    [rec] = parse_record(obj, "o")
    assert rec.prompt == [user("why")]
    assert rec.chosen == [assistant("it is good")]
    assert rec.rejected == [assistant("no")]


def test_hh_transcript_multi_turn_shared_prefix_is_prompt():
    """A multi-turn HH pair: the whole shared prefix (three turns) becomes the prompt."""
    prefix = "\n\nHuman: hello\n\nAssistant: hello there\n\nHuman: tell me about the cat"
    obj = {"chosen": prefix + "\n\nAssistant: the cat sat", "rejected": prefix + "\n\nAssistant: what cat"}
    [rec] = parse_record(obj, "o")
    assert rec.prompt == [user("hello"), assistant("hello there"), user("tell me about the cat")]
    assert rec.chosen == [assistant("the cat sat")]
    assert rec.rejected == [assistant("what cat")]


def test_parse_hh_transcript_docstring_example():
    """The docstring example of parse_hh_transcript."""
    assert parse_hh_transcript("\n\nHuman: Hi\n\nAssistant: Hello!") == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\n\nHuman:Hi\n\nAssistant:Yo", [user("Hi"), assistant("Yo")]),  # space after the colon is optional
        ("  \n\nHuman:  a  \n\nAssistant: b\n", [user("a"), assistant("b")]),  # leading whitespace, contents stripped
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            [user("a"), assistant("b"), user("c"), assistant("d")],
        ),
        ("\n\nHuman: line one\nline two", [user("line one\nline two")]),  # a single newline stays inside a turn
    ],
)
def test_parse_hh_transcript_examples(text, expected):
    """parse_hh_transcript splits turns, strips contents, maps Human/Assistant to user/assistant."""
    assert parse_hh_transcript(text) == expected


def test_parse_hh_transcript_rejects_leading_text():
    """Text before the first '\\n\\nHuman:' is an error."""
    with pytest.raises(ValueError, match="does not start with"):
        parse_hh_transcript("preamble\n\nHuman: a\n\nAssistant: b")


def test_hh_leading_text_is_data_error_with_origin():
    """Through parse_record, a transcript with leading text becomes a DataError naming the origin."""
    with pytest.raises(DataError, match=r"^f:7: transcript does not start"):
        parse_record({"chosen": "x\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "f:7")


def test_hh_prefix_with_only_the_human_turn_raises():
    """An HH transcript that is only the opening Human turn (a strict prefix of the other) raises DataError."""
    obj = {"chosen": "\n\nHuman: hello", "rejected": "\n\nHuman: hello\n\nAssistant: yes"}
    with pytest.raises(DataError):
        parse_record(obj, "o")
    with pytest.raises(DataError):
        parse_record({"chosen": obj["rejected"], "rejected": obj["chosen"]}, "o")


STRICT_PREFIX = (
    "\n\nHuman: hello\n\nAssistant: yes",
    "\n\nHuman: hello\n\nAssistant: yes\n\nHuman: why\n\nAssistant: no",
)


@pytest.mark.parametrize("swap", [False, True])
def test_hh_strict_prefix_transcript_raises(swap):
    """An HH pair where one full transcript is a strict prefix of the other must raise DataError at parse time."""
    chosen, rejected = STRICT_PREFIX[::-1] if swap else STRICT_PREFIX
    with pytest.raises(DataError):
        parse_record({"chosen": chosen, "rejected": rejected}, "o")


def test_hh_strict_prefix_transcript_does_not_crash():
    """The strict-prefix HH pair never raises anything other than DataError when parsed."""
    for chosen, rejected in (STRICT_PREFIX, STRICT_PREFIX[::-1]):
        try:
            parse_record({"chosen": chosen, "rejected": rejected}, "o")
        except DataError:
            pass


@pytest.mark.parametrize(
    "obj",
    [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a \n\nAssistant:  b  "},  # same after strip
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": [user("a")], "chosen": "same", "rejected": [assistant("same")]},
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
        {"text": ["\n\nHuman: a\n\nAssistant: b"] * 2, "score": [1, 0]},
    ],
)
def test_identical_chosen_and_rejected_raise(obj):
    """A record whose chosen equals its rejected (in any layout) raises DataError."""
    with pytest.raises(DataError, match=r"^o: chosen and rejected are identical$"):
        parse_record(obj, "o")


def ultrafeedback(prompt, chosen, rejected, asked=None):
    """An UltraFeedback-binarized row: the prompt as text, and whole conversations that repeat it."""
    asked = prompt if asked is None else asked
    return {"prompt": prompt, "chosen": [user(asked), assistant(chosen)], "rejected": [user(asked), assistant(rejected)]}


def test_ultrafeedback_binarized_takes_the_shared_turns_as_prompt():
    """A text prompt beside whole conversations: the shared opening turns become the prompt."""
    (rec,) = parse_record(ultrafeedback("tell me about the cat", "the cat sat", "the dog ran"), "f:1")
    assert rec == PreferenceRecord([user("tell me about the cat")], [assistant("the cat sat")], [assistant("the dog ran")], "f:1")


def test_ultrafeedback_binarized_with_system_and_earlier_turns():
    """The text prompt is the last shared user turn; earlier shared turns stay in the prompt."""
    opening = [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello"), user("why")]
    obj = {"prompt": " why ", "chosen": [*opening, assistant("so")], "rejected": [*opening, assistant("no")]}
    (rec,) = parse_record(obj, "f:1")
    assert rec.prompt == opening and rec.chosen == [assistant("so")] and rec.rejected == [assistant("no")]


def test_ultrafeedback_binarized_prompt_disagreeing_with_conversations_names_line(tmp_path):
    """A text prompt that is not the conversations' last shared user turn is refused, naming file and line."""
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback("a", "b", "c"), ultrafeedback("what is it", "b", "c", asked="what was it")])
    with pytest.raises(DataError, match=rf"^{path}:2: 'prompt' differs from the last user turn that 'chosen' and 'rejected' share$"):
        read_records(path)


@pytest.mark.parametrize(
    "chosen, rejected, message",
    [
        ([assistant("b")], [assistant("c")], "'chosen' is a message list but 'prompt' is plain text"),
        ([user("a"), assistant("b")], "c", "'chosen' is a message list but 'prompt' is plain text"),
        ([user("a"), assistant("b")], [user("x"), assistant("c")], "share no opening turn"),
    ],
)
def test_text_prompt_with_inconsistent_message_lists_is_refused(chosen, rejected, message):
    """Response-only message lists, a list beside a string, or conversations with different prompts stay refused."""
    with pytest.raises(DataError, match=message):
        parse_record({"prompt": "a", "chosen": chosen, "rejected": rejected}, "f:1")


def test_plain_chosen_without_prompt_or_transcript_is_rejected():
    """Plain-text chosen/rejected without a prompt and without HH markers raise a helpful DataError."""
    with pytest.raises(DataError, match="plain text without an explicit 'prompt'"):
        parse_record({"chosen": "yes", "rejected": "no"}, "o")


@pytest.mark.parametrize(
    "score, chosen, rejected",
    [([0, 1], "b", "a"), ([1, 0], "a", "b"), ([-0.5, -2.0], "a", "b"), ([0.1, 0.2], "b", "a")],
)
def test_scored_pair_orders_by_score(score, chosen, rejected):
    """{'text': [a, b], 'score': [sa, sb]}: the higher-scored transcript is chosen."""
    text = ["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"]
    [rec] = parse_record({"text": text, "score": score}, "o")
    assert rec.prompt == [user("q")]
    assert rec.chosen == [assistant(chosen)]
    assert rec.rejected == [assistant(rejected)]


def test_scored_pair_default_score_prefers_first():
    """Without 'score' the first transcript is chosen."""
    [rec] = parse_record({"text": ["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"]}, "o")
    assert (rec.chosen, rec.rejected) == ([assistant("a")], [assistant("b")])


def test_scored_pair_accepts_message_lists():
    """The transcripts of a scored pair may also be message lists."""
    text = [[user("q"), assistant("a")], [user("q"), assistant("b")]]
    [rec] = parse_record({"text": text, "score": [0, 1]}, "o")
    assert (rec.prompt, rec.chosen, rec.rejected) == ([user("q")], [assistant("b")], [assistant("a")])


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"text": ["\n\nHuman: q\n\nAssistant: a"], "score": [1]}, "lists of two"),
        ({"text": "\n\nHuman: q\n\nAssistant: a", "score": [1, 0]}, "lists of two"),
        ({"text": ["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"], "score": [1, 1]}, "two different numbers"),
        ({"text": ["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"], "score": ["1", 0]}, "two different numbers"),
        ({"text": ["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"], "score": None}, "lists of two"),
        ({"text": [1, 2], "score": [1, 0]}, "non-empty list of messages"),
    ],
)
def test_scored_pair_invalid(obj, message):
    """Malformed scored pairs raise DataError with the reason."""
    with pytest.raises(DataError, match=message):
        parse_record(obj, "o")


DSP = {
    "query": "tell me about the dog",
    "responses": {
        "concise": "the dog ran",
        "friendly": "hello there the dog ran and sat",
        "academic": "the dog is a big dog",
        "sarcastic": "",  # empty: no preference, left out
        "copy": "the dog ran",  # identical to the preferred text: left out
    },
}


def test_multi_response_one_pair_per_other_style():
    """DSP multi-response: one pair per other non-empty, different style, sorted by style, sharing prompt and chosen."""
    recs = parse_record(DSP, "o", prefer="concise")
    prompt = [user("tell me about the dog")]
    chosen = [assistant("the dog ran")]
    assert recs == [
        PreferenceRecord(prompt, chosen, [assistant("the dog is a big dog")], "o"),
        PreferenceRecord(prompt, chosen, [assistant("hello there the dog ran and sat")], "o"),
    ]


def test_multi_response_other_preferred_style():
    """Changing `prefer` changes the chosen text; the formerly preferred text (and its copy) become rejected ones."""
    recs = parse_record(DSP, "o", prefer="academic")
    assert [r.chosen for r in recs] == [[assistant("the dog is a big dog")]] * 3
    assert [r.rejected for r in recs] == [  # styles concise, copy, friendly (sorted); sarcastic is empty
        [assistant("the dog ran")],
        [assistant("the dog ran")],
        [assistant("hello there the dog ran and sat")],
    ]


@pytest.mark.parametrize(
    "prefer, responses, message",
    [
        (None, {"a": "x", "b": "y"}, r"need a preferred style \(prefer=...\); styles: a, b"),
        ("c", {"a": "x", "b": "y"}, r"no response for preferred style 'c'; styles: a, b"),
        ("a", {}, "must be an object"),
        ("a", ["x", "y"], "must be an object"),
        ("a", {"a": "", "b": "y"}, "'responses.a' is empty"),
        ("a", {"a": "x", "b": 3}, "'responses.b' must be a string, got int"),
    ],
)
def test_multi_response_invalid(prefer, responses, message):
    """Malformed multi-response records raise DataError with the reason."""
    with pytest.raises(DataError, match=message):
        parse_record({"query": "q", "responses": responses}, "o", prefer=prefer)


def test_multi_response_with_nothing_left_is_skipped_and_counted():
    """A multi-response record whose other responses are all empty or equal yields no pair and is counted as skipped."""
    rows = [
        {"query": "why", "responses": {"a": "yes", "b": "", "c": "yes"}},
        {"query": "how", "responses": {"a": "so", "b": "no"}},
    ]
    assert parse_record(rows[0], "o", prefer="a") == []
    report = read_records(rows, prefer="a")
    assert [r.rejected for r in report.records] == [[assistant("no")]]
    assert report.skipped == ["<records>[0]: no response differs from the preferred one"]


def test_unrecognised_record():
    """A dict in no known layout raises DataError listing its fields."""
    with pytest.raises(DataError, match=r"^o: unrecognised record with fields \['chosen', 'prompt'\]"):
        parse_record({"prompt": "a", "chosen": "b"}, "o")


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None])
def test_non_object_record(obj):
    """A record that is not a JSON object raises DataError naming the type."""
    with pytest.raises(DataError, match=f"must be a JSON object, got {type(obj).__name__}"):
        parse_record(obj, "o")


@pytest.mark.parametrize(
    "obj, message",
    [
        ({**GOOD, "chosen": 5}, "'chosen' must be a string or a list of messages, got int"),
        ({**GOOD, "prompt": 5}, "'prompt' must be a string or a list of messages, got int"),
        ({**GOOD, "rejected": ""}, "'rejected' is empty"),
        ({**GOOD, "prompt": "   "}, "'prompt' is empty"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty list of messages"),
        ({"prompt": [user("a")], "chosen": 5, "rejected": "b"}, "'chosen' must be a non-empty list of messages"),
        ({"prompt": [user("a")], "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": [{"role": "bot", "content": "a"}], "chosen": "a", "rejected": "b"}, r"'prompt\[0\]' has role 'bot'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"'prompt\[0\]' must be an object"),
        ({"prompt": [user("a"), "hi"], "chosen": "a", "rejected": "b"}, r"'prompt\[1\]' must be an object"),
        ({"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"}, r"'prompt\[0\]' must be an object"),
        ({"chosen": [user("a"), assistant("b")], "rejected": 7}, "'rejected' must be a non-empty list of messages"),
    ],
)
def test_field_type_errors(obj, message):
    """Wrong field types, empty strings, and bad messages raise DataError prefixed with the origin."""
    with pytest.raises(DataError, match=r"^f:2: " + message):
        parse_record(obj, "f:2")


def test_data_error_is_a_value_error_and_qadapter_error():
    """DataError is catchable both as ValueError and as the library's base error."""
    assert issubclass(DataError, ValueError) and issubclass(DataError, QAdapterError)


def test_prompt_key_is_stable_and_distinguishes_layouts():
    """prompt_key is equal for equal prompts and differs between plain text and a message list."""
    a = PreferenceRecord([user("a")], [assistant("b")], [assistant("c")])
    b = PreferenceRecord([user("a")], [assistant("x")], [assistant("y")], "other")
    c = PreferenceRecord("a", "b", "c")
    assert a.prompt_key == b.prompt_key == '[{"content": "a", "role": "user"}]'
    assert c.prompt_key == '"a"'


# ---------------------------------------------------------------------------------------------
# Files


def test_read_jsonl_with_origins(tmp_path):
    """A .jsonl file yields one record per line with origin 'path:line' (blank lines counted, not parsed)."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "   ", {**GOOD, "chosen": "yes"}])
    report = read_records(path)
    assert isinstance(report, LoadReport)
    assert [r.origin for r in report.records] == [f"{path}:1", f"{path}:4"]
    assert [r.chosen for r in report.records] == ["the cat sat", "yes"]
    assert report.skipped == []


def test_read_jsonl_from_str_path(tmp_path):
    """A str path works the same as a Path."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert read_records(str(path)).records == [PreferenceRecord(*GOOD.values(), f"{path}:1")]


def test_read_json_list(tmp_path):
    """A .json list of records yields origins 'path[i]'."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "rejected": "no"}], indent=2), encoding="utf-8")
    report = read_records(path)
    assert [r.origin for r in report.records] == [f"{path}[0]", f"{path}[1]"]
    assert [r.rejected for r in report.records] == ["the dog ran", "no"]


def test_read_json_data_key_and_single_record(tmp_path):
    """A .json object with a 'data' list, or a single record object, are both accepted."""
    wrapped, single = tmp_path / "w.json", tmp_path / "s.json"
    wrapped.write_text(json.dumps({"data": [GOOD, GOOD]}), encoding="utf-8")
    single.write_text(json.dumps(GOOD), encoding="utf-8")
    assert len(read_records(wrapped).records) == 2
    assert read_records(single).records == [PreferenceRecord(*GOOD.values(), f"{single}[0]")]


def test_read_json_not_a_list(tmp_path):
    """A .json file holding a scalar (or a non-list 'data') raises DataError naming the file."""
    path = tmp_path / "d.json"
    path.write_text("5", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}: expected a JSON list of records$"):
        read_records(path)


def test_read_json_invalid_names_line(tmp_path):
    """Invalid JSON in a .json file raises DataError with 'path:line'."""
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a",\n   "chosen": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        read_records(path)


def test_read_json_record_error_names_index(tmp_path):
    """A malformed record in a .json list names 'path[i]'."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "chosen": 1}]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}\[1\]: 'chosen' must be a string"):
        read_records(path)


def test_read_jsonl_gz(tmp_path):
    """A gzip-compressed .jsonl.gz reads like .jsonl, with line numbers in origins."""
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "chosen": "yes"}) + "\n")
    report = read_records(path)
    assert [r.origin for r in report.records] == [f"{path}:1", f"{path}:3"]
    assert [r.chosen for r in report.records] == ["the cat sat", "yes"]


def test_read_json_gz(tmp_path):
    """A gzip-compressed .json.gz reads as a JSON list."""
    path = tmp_path / "d.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump([GOOD], handle)
    assert read_records(path).records == [PreferenceRecord(*GOOD.values(), f"{path}[0]")]


def test_jsonl_gz_error_names_line(tmp_path):
    """A malformed line inside .jsonl.gz still names the file and line."""
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "rejected": 2}) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: 'rejected' must be a string"):
        read_records(path)


@pytest.mark.parametrize(
    "content",
    [b"this is not gzip data", gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:-12]],
    ids=["not-gzip", "truncated"],
)
def test_broken_gzip(tmp_path, content):
    """A file named .gz that is not gzip, or is truncated, raises DataError 'broken gzip file'."""
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{path}: broken gzip file"):
        read_records(path)


@pytest.mark.parametrize(
    "line3, message",
    [
        ('{"prompt": "a", "chosen": "b", ', "invalid JSON"),
        ("[1, 2, 3]", "a record must be a JSON object, got list"),
        ('{"prompt": "a", "chosen": "b"}', "unrecognised record with fields"),
        ('{"prompt": "a", "chosen": 1, "rejected": "b"}', "'chosen' must be a string or a list of messages, got int"),
        ('{"prompt": "a", "chosen": "", "rejected": "b"}', "'chosen' is empty"),
        ('{"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"}', "has role 'robot'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line3, message):
    """Every malformed line 3 of a .jsonl raises DataError starting with 'path:3: ' and the reason."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, line3, GOOD])
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def _non_utf8_file(tmp_path, n_good_lines=2):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good * n_good_lines + b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n' + good)
    return path


def test_non_utf8_raises_data_error_naming_file(tmp_path):
    """Non-UTF-8 bytes raise DataError naming the file and line (not a UnicodeDecodeError)."""
    path = _non_utf8_file(tmp_path)
    with pytest.raises(DataError, match=f"^{path}:3: not UTF-8 text"):
        read_records(path)


def test_non_utf8_names_line(tmp_path):
    """Non-UTF-8 bytes on line 3 of a .jsonl name 'path:3' like every other malformed record."""
    path = _non_utf8_file(tmp_path)
    with pytest.raises(DataError, match=f"^{path}:3: "):
        read_records(path)


def test_non_utf8_byte_offset_is_line_offset(tmp_path):
    """Past 8 KiB too, the message names the line and the offending byte's offset within that line."""
    path = _non_utf8_file(tmp_path, n_good_lines=300)
    data = path.read_bytes()
    offset = data.index(b"\xe9")
    assert offset > 8192
    line_start = data.rindex(b"\n", 0, offset) + 1
    lineno = data.count(b"\n", 0, offset) + 1
    with pytest.raises(DataError, match=rf"^{path}:{lineno}: .*at byte {offset - line_start} of the line\)$"):
        read_records(path)


def test_non_utf8_json_names_file_offset(tmp_path):
    """In a .json file the offset is counted from the start of the file."""
    path = tmp_path / "d.json"
    data = b'[{"prompt": "a", "chosen": "b", "rejected": "c\xe9"}]'
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{path}: not UTF-8 text .*at byte {data.index(bytes([0xE9]))} of the file\)$"):
        read_records(path)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.jsonl.gz"])
def test_missing_file(tmp_path, name):
    """A missing data file raises DataError naming it."""
    path = tmp_path / name
    with pytest.raises(DataError, match=f"^{path}: no such data file$"):
        read_records(path)


def test_folder_without_data_names_it(tmp_path):
    """A folder that is neither a save_to_disk folder nor holds data files raises DataError naming it."""
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match=rf"^{tmp_path}: could not load with datasets.load_dataset \(.*doesn't contain any data files"):
        read_records(tmp_path)


def test_dataset_name_without_datasets_installed(tmp_path, monkeypatch):
    """A non-file source needs `datasets`; without it a DataError says how to install it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"^someone/prefs: not a file, .*pip install datasets"):
        read_records("someone/prefs")


# ---------------------------------------------------------------------------------------------
# Sources read through `datasets`


def triples(report):
    return [(r.prompt, r.chosen, r.rejected) for r in report.records]


@pytest.fixture()
def datasets():
    return pytest.importorskip("datasets")


@pytest.fixture()
def pairs():
    """Rows of two sets told apart by their words: 'good' beats 'bad' in one, 'nice' beats 'poor' in the other."""
    return {"train": marker_records(3), "test": marker_records(2, seed=1, chosen="nice", rejected="poor")}


def test_read_parquet_file(tmp_path, datasets, pairs):
    """A .parquet file is read through datasets, row by row, with origins 'file[row]'."""
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(pairs["train"]).to_parquet(str(path))
    report = read_records(path)
    assert triples(report) == triples(read_records(pairs["train"]))
    assert report.records[1].origin == f"{path}[1]"


def test_parquet_error_names_row(tmp_path, datasets, pairs):
    """A malformed Parquet row raises DataError naming the file and row."""
    path = tmp_path / "pairs.parquet"
    rows = [*pairs["train"][:2], {**pairs["train"][2], "rejected": pairs["train"][2]["chosen"]}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path}\[2\]: chosen and rejected are identical$"):
        read_records(path)


def test_read_save_to_disk_dataset_folder(tmp_path, datasets, pairs):
    """A Dataset saved with save_to_disk is read through load_from_disk; it has no split to choose."""
    datasets.Dataset.from_list(pairs["train"]).save_to_disk(str(tmp_path / "ds"))
    assert triples(read_records(tmp_path / "ds")) == triples(read_records(pairs["train"]))
    with pytest.raises(DataError, match="holds a single split, so split 'test' cannot be chosen"):
        read_records(tmp_path / "ds", split="test")


def test_read_save_to_disk_dataset_dict_folder(tmp_path, datasets, pairs):
    """A saved DatasetDict: train by default, another split by name, and a missing split lists the others."""
    folder = tmp_path / "dd"
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in pairs.items()}).save_to_disk(str(folder))
    assert triples(read_records(folder)) == triples(read_records(pairs["train"]))
    test = read_records(str(folder), split="test")
    assert triples(test) == triples(read_records(pairs["test"])) and test.records[0].origin == f"{folder}[test][0]"
    with pytest.raises(DataError, match=rf"^{folder}: no split 'valid'; splits: train, test$"):
        read_records(folder, split="valid")


def test_read_dataset_and_dataset_dict_objects(datasets, pairs):
    """Dataset and DatasetDict objects are read like the files they could be saved to."""
    dataset_dict = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in pairs.items()})
    assert triples(read_records(dataset_dict["test"])) == triples(read_records(pairs["test"]))
    assert triples(read_records(dataset_dict)) == triples(read_records(pairs["train"]))
    report = read_records(dataset_dict, split="test")
    assert triples(report) == triples(read_records(pairs["test"])) and report.records[0].origin == "<records>[test][0]"
    with pytest.raises(DataError, match=r"^<records>: no split 'valid'; splits: train, test$"):
        read_records(dataset_dict, split="valid")
    with pytest.raises(DataError, match="single split"):
        read_records(dataset_dict["train"], split="train")
    with pytest.raises(DataError, match="only a datasets name or folder has configs"):
        read_records(dataset_dict, config="default")


def test_read_folder_of_data_files_by_split(tmp_path, datasets, pairs):
    """A folder of data files is read by load_dataset: train by default, --split picks another, and a
    missing split is one line listing the available ones."""
    for name, rows in pairs.items():
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    assert triples(read_records(tmp_path)) == triples(read_records(pairs["train"]))
    assert triples(read_records(tmp_path, split="test")) == triples(read_records(pairs["test"]))
    with pytest.raises(DataError, match=r"Unknown split \"valid\". Should be one of \['train', 'test'\]") as caught:
        read_records(tmp_path, split="valid")
    assert str(caught.value).startswith(f"{tmp_path}: ") and "\n" not in str(caught.value)


def test_read_folder_config(tmp_path, datasets, pairs):
    """A folder whose README declares configurations: config picks one; a missing one lists the others."""
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: plain\n  data_files: plain/*.jsonl\n- config_name: other\n  data_files: other/*.jsonl\n---\n"
    )
    for config, rows in (("plain", pairs["train"]), ("other", pairs["test"])):
        (tmp_path / config).mkdir()
        write_jsonl(tmp_path / config / "train.jsonl", rows)
    assert triples(read_records(tmp_path, config="other")) == triples(read_records(pairs["test"]))
    with pytest.raises(DataError, match=r"'missing' not found. Available: \['plain', 'other'\]"):
        read_records(tmp_path, config="missing")


@pytest.mark.parametrize("choice", [{"split": "test"}, {"config": "plain"}])
def test_single_file_refuses_split_and_config(tmp_path, choice):
    """A file has one split and no configs: asking for one is an error, not silently ignored."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(DataError, match=rf"^{path}: a single file has no splits or configs to choose from$"):
        read_records(path, **choice)


def test_read_records_from_iterable():
    """An iterable of dicts is read with origins '<records>[i]'."""
    report = read_records(iter([GOOD, {**GOOD, "chosen": "yes"}]))
    assert [r.origin for r in report.records] == ["<records>[0]", "<records>[1]"]


def test_skip_invalid_skips_and_counts(tmp_path):
    """skip_invalid=True keeps good records and reports each bad record's origin and reason."""
    lines = [
        GOOD,
        "[1, 2]",
        {"prompt": "a", "chosen": "b"},
        {**GOOD, "chosen": 3},
        {**GOOD, "rejected": " "},
        {"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"},
        {**GOOD, "chosen": "yes"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    report = read_records(path, skip_invalid=True)
    assert [r.origin for r in report.records] == [f"{path}:1", f"{path}:7"]
    assert len(report.skipped) == 5
    assert [s.split(": ", 1)[0] for s in report.skipped] == [f"{path}:{i}" for i in range(2, 7)]
    assert "got list" in report.skipped[0] and "'rejected' is empty" in report.skipped[3]


def test_without_skip_invalid_the_first_bad_record_raises(tmp_path):
    """Without skip_invalid the first malformed record stops reading."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "chosen": 3}, "[1]"])
    with pytest.raises(DataError, match=f"^{path}:2: "):
        read_records(path)


def test_skip_invalid_skips_invalid_json_lines(tmp_path):
    """skip_invalid=True also skips a line that is not valid JSON, and keeps reading after it."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"prompt": ', {**GOOD, "chosen": "yes"}])
    report = read_records(path, skip_invalid=True)
    assert [r.origin for r in report.records] == [f"{path}:1", f"{path}:3"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{path}:2: invalid JSON")


def test_all_records_skipped_raises(tmp_path):
    """When nothing usable remains, read_records raises DataError with the skipped count."""
    path = write_jsonl(tmp_path / "d.jsonl", ["[1]", {**GOOD, "chosen": 3}])
    with pytest.raises(DataError, match=r"no usable preference records \(2 skipped\)$"):
        read_records(path, skip_invalid=True)


def test_empty_file_raises(tmp_path):
    """An empty .jsonl raises DataError 'no usable preference records'."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}: no usable preference records$"):
        read_records(path)


def test_read_mixed_layouts_in_one_file(tmp_path):
    """Layouts are detected per record: one file may mix them."""
    lines = [
        GOOD,
        {"chosen": "\n\nHuman: why\n\nAssistant: yes", "rejected": "\n\nHuman: why\n\nAssistant: no"},
        {"text": ["\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c"], "score": [0, 1]},
        {"query": "how", "responses": {"x": "fast", "y": "slow", "z": "big"}},
    ]
    report = read_records(write_jsonl(tmp_path / "d.jsonl", lines), prefer="x")
    assert len(report.records) == 5
    assert [r.conversational for r in report.records] == [False, True, True, True, True]
    assert report.records[2].chosen == [assistant("c")]


# ---------------------------------------------------------------------------------------------
# split_by_prompt


def _records(n_prompts, pairs_per_prompt=3):
    return [
        PreferenceRecord([user(f"prompt {p}")], [assistant(f"good {p} {k}")], [assistant(f"bad {p} {k}")], f"o:{p}:{k}")
        for p in range(n_prompts)
        for k in range(pairs_per_prompt)
    ]


def _prompts(records):
    return {r.prompt_key for r in records}


def test_split_no_prompt_in_both():
    """Every pair lands in exactly one split, all pairs of a prompt together; eval holds round(n*fraction) prompts."""
    records = _records(20)
    train, held_out = split_by_prompt(records, 0.25, seed=3)
    assert not _prompts(train) & _prompts(held_out)
    assert len(_prompts(held_out)) == 5 and len(_prompts(train)) == 15
    assert len(train) == 45 and len(held_out) == 15
    assert sorted(r.origin for r in train + held_out) == sorted(r.origin for r in records)


def test_split_keeps_input_order_within_each_split():
    """Both splits keep the records' input order."""
    records = _records(10)
    train, held_out = split_by_prompt(records, 0.3)
    assert train == [r for r in records if r in train]
    assert held_out == [r for r in records if r in held_out]


def test_split_deterministic_for_seed():
    """The same seed gives the same split; some other seed gives a different one."""
    records = _records(20)
    first = split_by_prompt(records, 0.25, seed=7)
    assert split_by_prompt(records, 0.25, seed=7) == first
    others = {frozenset(_prompts(split_by_prompt(records, 0.25, seed=s)[1])) for s in range(5)}
    assert len(others) > 1


def test_split_independent_of_input_order():
    """Which prompts are held out does not depend on the order of the records."""
    records = _records(20)
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    for seed in (0, 1, 2):
        assert _prompts(split_by_prompt(records, 0.2, seed)[1]) == _prompts(split_by_prompt(shuffled, 0.2, seed)[1])
        assert _prompts(split_by_prompt(records[::-1], 0.2, seed)[1]) == _prompts(split_by_prompt(records, 0.2, seed)[1])


def test_split_small_fraction_holds_out_at_least_one_prompt():
    """A fraction rounding to zero prompts still holds out one."""
    train, held_out = split_by_prompt(_records(5), 0.01)
    assert len(_prompts(held_out)) == 1 and len(_prompts(train)) == 4


@pytest.mark.parametrize("n_prompts, fraction", [(1, 0.5), (2, 0.9), (0, 0.5), (3, 0.99)])
def test_split_too_few_prompts(n_prompts, fraction):
    """Too few distinct prompts to leave some for training raises DataError (several pairs per prompt do not count)."""
    with pytest.raises(DataError, match="too few to hold some out"):
        split_by_prompt(_records(n_prompts, pairs_per_prompt=4), fraction)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_fraction_out_of_range(fraction):
    """eval_fraction outside (0, 1) raises DataError."""
    with pytest.raises(DataError, match=r"eval_fraction must be in \(0, 1\)"):
        split_by_prompt(_records(10), fraction)
