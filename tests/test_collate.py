"""qadapter.collate: rendering, tokenizing and truncating pairs, padded batches, prompt-grouped batching."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECIAL, WORDS, build_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from qadapter.collate import (
    PreferenceBatch,
    TokenizedPair,
    collate_pairs,
    eos_ids,
    pad_shared,
    prompt_grouped_batches,
    render,
    tokenize_pair,
    truncate,
)
from qadapter.data import PreferenceRecord
from qadapter.errors import DataError

# The conftest tokenizer's vocabulary, written out independently of the tokenizer.
VOCAB = {tok: i for i, tok in enumerate(SPECIAL + ["system", "user", "assistant", "tool"] + WORDS)}
PAD, BOS, EOS = 0, 1, 2  # <pad>, <|im_start|>, <|im_end|>


def ids(text):
    """Expected ids of whitespace-separated known tokens."""
    return [VOCAB[w] for w in text.split()]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONV = PreferenceRecord([user("tell me about the cat")], [assistant("the cat sat")], [assistant("the dog ran on the mat")], "f:4")
PLAIN = PreferenceRecord("tell me about the cat", "the cat sat", "the dog ran", "f:5")
CONV_PROMPT_IDS = ids("<|im_start|> user tell me about the cat <|im_end|> <|im_start|> assistant")


def test_vocabulary_assumptions(tok):
    """The hand-written ids match the conftest tokenizer (guards every exact expectation below)."""
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    assert tok("the cat sat <|im_end|>", add_special_tokens=False)["input_ids"] == [8, 10, 12, 2]


# ---------------------------------------------------------------------------------------------
# render


def test_render_conversational_uses_chat_template(tok):
    """Prompt = template with the generation prompt; response = what the full conversation adds after it."""
    prompt, chosen, rejected = render(CONV, tok)
    assert prompt == "<|im_start|>user\ntell me about the cat<|im_end|>\n<|im_start|>assistant\n"
    assert chosen == "the cat sat<|im_end|>\n"
    assert rejected == "the dog ran on the mat<|im_end|>\n"


def test_render_multi_turn_response(tok):
    """A response of several turns renders all of them after the generation prompt."""
    rec = PreferenceRecord([user("why")], [assistant("yes"), user("how"), assistant("so")], [assistant("no")])
    _, chosen, _ = render(rec, tok)
    assert chosen == "yes<|im_end|>\n<|im_start|>user\nhow<|im_end|>\n<|im_start|>assistant\nso<|im_end|>\n"


def test_render_plain_text_passes_through(tok):
    """Plain-text records are returned unchanged, no template applied."""
    assert render(PLAIN, tok) == ("tell me about the cat", "the cat sat", "the dog ran")
    assert render(PLAIN, object()) == ("tell me about the cat", "the cat sat", "the dog ran")


def test_render_without_chat_template_raises_naming_origin():
    """A conversational record with a tokenizer lacking a chat template raises DataError naming the origin."""
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match=r"^f:4: conversational record, but the tokenizer has no chat template$"):
        render(CONV, bare)
    with pytest.raises(DataError, match="^f:4: "):
        tokenize_pair(CONV, bare, 64, 8)


def test_render_template_not_prompt_plus_response_raises():
    """A template whose full conversation does not start with the generation-prompt rendering raises DataError."""
    odd = build_tokenizer()
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>answer\n{% endif %}"
    )
    with pytest.raises(DataError, match="^f:4: the chat template does not render the chosen conversation"):
        render(CONV, odd)


# ---------------------------------------------------------------------------------------------
# eos_ids


@pytest.mark.parametrize("extra, expected", [(None, {2}), (7, {2, 7}), ([7, 9], {2, 7, 9}), ([], {2}), (2, {2})])
def test_eos_ids(tok, extra, expected):
    """eos_ids is the tokenizer's EOS plus the extra id(s)."""
    assert eos_ids(tok, extra) == expected


def test_eos_ids_without_tokenizer_eos():
    """A tokenizer with no EOS contributes nothing."""

    class NoEos:
        eos_token_id = None

    assert eos_ids(NoEos()) == set()
    assert eos_ids(NoEos(), [4]) == {4}


# ---------------------------------------------------------------------------------------------
# tokenize_pair


def test_tokenize_conversational_pair(tok):
    """Conversational pair: template prompt ids shared, each response ends with EOS and nothing after it."""
    pair = tokenize_pair(CONV, tok, max_length=64, max_prompt_length=8)
    assert pair == TokenizedPair(
        tuple(CONV_PROMPT_IDS), tuple(ids("the cat sat <|im_end|>")), tuple(ids("the dog ran on the mat <|im_end|>")), "f:4"
    )
    assert pair.chosen[-1] == EOS and pair.rejected[-1] == EOS


def test_tokenize_pair_prompt_ids_identical_for_both_responses(tok):
    """Both sequences continue the very same prompt ids, which are the ids of the rendered prompt."""
    pair = tokenize_pair(CONV, tok, 64, 8)
    prompt_text, chosen_text, rejected_text = render(CONV, tok)
    assert list(pair.prompt) == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert list(pair.prompt + pair.chosen) == tok(prompt_text + chosen_text, add_special_tokens=False)["input_ids"]
    assert list(pair.prompt + pair.rejected) == tok(prompt_text + rejected_text, add_special_tokens=False)["input_ids"]


def test_tokenize_response_cut_after_first_eos(tok):
    """Nothing after the first <|im_end|> is kept: later turns of a multi-turn response are dropped."""
    rec = PreferenceRecord(
        [user("why")], [assistant("yes"), user("how"), assistant("so")], [assistant("no"), user("what")], "o"
    )
    pair = tokenize_pair(rec, tok, 64, 8)
    assert pair.chosen == (VOCAB["yes"], EOS)
    assert pair.rejected == (VOCAB["no"], EOS)


def test_tokenize_extra_eos_cuts_response(tok):
    """An extra EOS id (e.g. from a generation config) ends the response too, and is kept as its last token."""
    rec = PreferenceRecord([user("why")], [assistant("yes so no")], [assistant("no")], "o")
    pair = tokenize_pair(rec, tok, 64, 8, extra_eos=VOCAB["so"])
    assert pair.chosen == tuple(ids("yes so"))
    assert pair.rejected == tuple(ids("no <|im_end|>"))


def test_tokenize_plain_text_appends_eos(tok):
    """Plain-text responses get EOS appended; the prompt is tokenized as is."""
    pair = tokenize_pair(PLAIN, tok, 64, 8)
    assert pair == TokenizedPair(
        tuple(ids("tell me about the cat")), tuple(ids("the cat sat <|im_end|>")), tuple(ids("the dog ran <|im_end|>")), "f:5"
    )


def test_tokenize_plain_text_with_eos_inside_is_cut_not_extended(tok):
    """A plain-text response already containing EOS is cut after it, with no second EOS added."""
    rec = PreferenceRecord("why", "yes <|im_end|> and more", "no", "o")
    pair = tokenize_pair(rec, tok, 64, 8)
    assert pair.chosen == (VOCAB["yes"], EOS)
    assert pair.rejected == (VOCAB["no"], EOS)


def test_tokenize_special_tokens_only_for_plain_prompts():
    """A tokenizer adding BOS adds it to plain-text prompts only: never to responses or chat-template prompts."""
    from tokenizers import processors

    bos_tok = build_tokenizer()
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", BOS)]
    )
    plain = tokenize_pair(PLAIN, bos_tok, 64, 8)
    assert plain.prompt == (BOS, *ids("tell me about the cat"))
    assert plain.chosen == tuple(ids("the cat sat <|im_end|>"))
    conv = tokenize_pair(CONV, bos_tok, 64, 8)
    assert conv.prompt == tuple(CONV_PROMPT_IDS)  # one <|im_start|>, from the template
    assert conv.chosen == tuple(ids("the cat sat <|im_end|>"))


def test_tokenize_truncates_prompt_from_left_first(tok):
    """Overflow is taken from the prompt's left while it has more than max_prompt_length tokens; responses intact."""
    # prompt 10 tokens, rejected 7: 17 > 14, so the prompt loses its 3 leftmost tokens.
    pair = tokenize_pair(CONV, tok, max_length=14, max_prompt_length=4)
    assert pair.prompt == tuple(CONV_PROMPT_IDS[3:])
    assert pair.chosen == tuple(ids("the cat sat <|im_end|>"))
    assert pair.rejected == tuple(ids("the dog ran on the mat <|im_end|>"))
    assert len(pair.prompt) + len(pair.rejected) == 14


def test_tokenize_truncates_responses_after_prompt_floor(tok):
    """Once the prompt is down to max_prompt_length, responses lose tokens from the right; total <= max_length."""
    pair = tokenize_pair(CONV, tok, max_length=8, max_prompt_length=4)
    assert pair.prompt == tuple(ids("cat <|im_end|> <|im_start|> assistant"))
    assert pair.chosen == tuple(ids("the cat sat <|im_end|>"))  # exactly fits the budget of 4
    assert pair.rejected == tuple(ids("the dog ran on"))  # cut from the right, loses its EOS
    assert len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) == 8


def test_tokenize_short_prompt_is_kept_whole(tok):
    """A prompt shorter than max_prompt_length is never cut; only the responses shrink."""
    rec = PreferenceRecord("why", "the cat sat on the mat", "the dog ran on the log", "o")
    pair = tokenize_pair(rec, tok, max_length=4, max_prompt_length=2)
    assert pair.prompt == (VOCAB["why"],)
    assert pair.chosen == tuple(ids("the cat sat"))
    assert pair.rejected == tuple(ids("the dog ran"))


def test_tokenize_identical_after_truncation_raises(tok):
    """Responses that differ only beyond the budget become identical and raise DataError naming origin and length."""
    rec = PreferenceRecord("why", "the cat sat", "the cat ran", "f:9")
    with pytest.raises(DataError, match=r"^f:9: chosen and rejected are identical after truncation to 3 tokens$"):
        tokenize_pair(rec, tok, max_length=3, max_prompt_length=1)


def test_tokenize_identical_after_eos_cut_raises(tok):
    """Responses identical up to their first EOS (differing only in later turns) raise DataError."""
    rec = PreferenceRecord([user("why")], [assistant("yes")], [assistant("yes"), user("how"), assistant("no")], "o")
    with pytest.raises(DataError, match="identical after truncation"):
        tokenize_pair(rec, tok, 64, 8)


def test_tokenize_hh_strict_prefix_record_is_rejected(tok):
    """The record parsed from an HH pair where one transcript prefixes the other is rejected at tokenization."""
    from qadapter.data import parse_record

    obj = {
        "chosen": "\n\nHuman: hello\n\nAssistant: yes",
        "rejected": "\n\nHuman: hello\n\nAssistant: yes\n\nHuman: why\n\nAssistant: no",
    }
    try:
        [rec] = parse_record(obj, "o")
    except DataError:
        return  # rejected earlier: also fine
    with pytest.raises(DataError):
        tokenize_pair(rec, tok, 64, 8)


def test_tokenize_empty_response_after_truncation_raises(tok):
    """With room for a single response token only, identical first tokens make the pair unusable."""
    with pytest.raises(DataError, match=r"^f:5: chosen and rejected are identical after truncation to 5 tokens$"):
        tokenize_pair(PLAIN, tok, max_length=5, max_prompt_length=5)


# ---------------------------------------------------------------------------------------------
# truncate


def test_truncate_fits_untouched():
    """No overflow: nothing is cut."""
    assert truncate([1, 2, 3], [[4, 5], [6]], max_length=5, max_prompt_length=1) == ([1, 2, 3], [[4, 5], [6]])


def test_truncate_prompt_left_only():
    """Overflow 2 with a long prompt: the two leftmost prompt tokens go, responses stay."""
    assert truncate([1, 2, 3, 4, 5, 6], [[7, 8], [9]], max_length=6, max_prompt_length=2) == ([3, 4, 5, 6], [[7, 8], [9]])


def test_truncate_prompt_floor_then_responses_right():
    """Prompt cut down to max_prompt_length, then responses cut from the right to the remaining budget."""
    prompt, responses = truncate([1, 2, 3, 4, 5, 6], [[7, 8, 9, 10, 11], [12, 13]], max_length=5, max_prompt_length=2)
    assert prompt == [5, 6]
    assert responses == [[7, 8, 9], [12, 13]]


def test_truncate_short_prompt_kept():
    """A prompt already shorter than max_prompt_length keeps all its tokens."""
    assert truncate([1], [[2, 3, 4, 5]], max_length=3, max_prompt_length=2) == ([1], [[2, 3]])


def test_truncate_overflow_uses_longest_response():
    """The overflow is measured on the longest response; the shared prompt is cut for all."""
    prompt, responses = truncate([1, 2, 3, 4], [[5], [6, 7, 8]], max_length=6, max_prompt_length=1)
    assert prompt == [2, 3, 4]
    assert responses == [[5], [6, 7, 8]]


def test_truncate_never_exceeds_max_length_even_with_large_prompt_floor():
    """Total length stays <= max_length even if max_prompt_length exceeds max_length."""
    prompt, responses = truncate(list(range(10)), [[10, 11, 12, 13, 14]], max_length=8, max_prompt_length=10)
    assert len(prompt) + max(len(r) for r in responses) <= 8


# ---------------------------------------------------------------------------------------------
# collate_pairs

DOC_PAIR = TokenizedPair((5, 6), (7, 2), (8, 9, 2))


def _long(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_collate_docstring_example():
    """The collate_pairs docstring example, right padding."""
    batch = collate_pairs([DOC_PAIR], pad_token_id=0)
    assert_close(batch.input_ids, _long([[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]))
    assert_close(batch.attention_mask, _long([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert_close(batch.completion_mask, _long([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]))
    assert_close(batch.chosen_index, _long([0]))
    assert_close(batch.rejected_index, _long([1]))
    assert batch.num_pairs == 1


def test_collate_docstring_example_left_padding():
    """Left padding mirrors the layout: same per-row content, pads first."""
    batch = collate_pairs([DOC_PAIR], pad_token_id=0, padding_side="left")
    assert_close(batch.input_ids, _long([[0, 5, 6, 7, 2], [5, 6, 8, 9, 2]]))
    assert_close(batch.attention_mask, _long([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert_close(batch.completion_mask, _long([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]))
    assert_close(batch.chosen_index, _long([0]))
    assert_close(batch.rejected_index, _long([1]))


def test_collate_left_and_right_same_content():
    """Per row, the unpadded ids and completion tokens agree between left and right padding."""
    pairs = [TokenizedPair((1, 2, 3), (4,), (5, 6, 7, 8)), TokenizedPair((9,), (10, 11), (12,))]
    right, left = collate_pairs(pairs, 99), collate_pairs(pairs, 99, "left")
    for row in range(right.input_ids.shape[0]):
        r, l = right.attention_mask[row].bool(), left.attention_mask[row].bool()
        assert right.input_ids[row][r].tolist() == left.input_ids[row][l].tolist()
        assert right.completion_mask[row][r].tolist() == left.completion_mask[row][l].tolist()
        assert (right.input_ids[row][~r] == 99).all() and (left.input_ids[row][~l] == 99).all()
    assert_close(right.chosen_index, left.chosen_index)
    assert_close(right.rejected_index, left.rejected_index)


def test_collate_non_zero_pad_id():
    """The pad id fills padding positions only."""
    batch = collate_pairs([TokenizedPair((1,), (2,), (3, 4))], pad_token_id=7)
    assert_close(batch.input_ids, _long([[1, 2, 7], [1, 3, 4]]))


def test_collate_completion_mask_exactly_response_tokens(tok):
    """On real tokenized pairs, completion_mask selects exactly each row's response ids."""
    pairs = [tokenize_pair(CONV, tok, 64, 8), tokenize_pair(PLAIN, tok, 64, 8)]
    batch = collate_pairs(pairs, PAD)
    assert batch.input_ids.shape == (4, 17)
    rows = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    for row, (prompt, response) in enumerate(rows):
        assert batch.input_ids[row][batch.completion_mask[row].bool()].tolist() == list(response)
        assert batch.input_ids[row][batch.attention_mask[row].bool()].tolist() == list(prompt + response)
        assert int(batch.completion_mask[row].sum()) == len(response)
    assert ((batch.completion_mask == 1) <= (batch.attention_mask == 1)).all()
    assert_close(batch.chosen_index, _long([0, 2]))
    assert_close(batch.rejected_index, _long([1, 3]))


def test_collate_shared_chosen_scored_once():
    """DSP-like: one chosen shared by four pairs is one row; indices point at the right rows."""
    prompt, chosen = (1, 2), (3, 2)
    pairs = [TokenizedPair(prompt, chosen, (4 + k, 2)) for k in range(4)]
    batch = collate_pairs(pairs, 0)
    assert_close(
        batch.input_ids, _long([[1, 2, 3, 2], [1, 2, 4, 2], [1, 2, 5, 2], [1, 2, 6, 2], [1, 2, 7, 2]])
    )
    assert_close(batch.chosen_index, _long([0, 0, 0, 0]))
    assert_close(batch.rejected_index, _long([1, 2, 3, 4]))
    assert batch.num_pairs == 4


def test_collate_dedup_across_roles_and_prompts():
    """A sequence that is one pair's rejected and another's chosen is one row; equal responses after different prompts are not merged."""
    pairs = [
        TokenizedPair((1,), (2,), (3,)),
        TokenizedPair((1,), (3,), (4,)),  # chosen == first pair's rejected
        TokenizedPair((9,), (2,), (3,)),  # same responses, different prompt
    ]
    batch = collate_pairs(pairs, 0)
    assert_close(batch.input_ids, _long([[1, 2], [1, 3], [1, 4], [9, 2], [9, 3]]))
    assert_close(batch.chosen_index, _long([0, 1, 3]))
    assert_close(batch.rejected_index, _long([1, 2, 4]))
    for k, pair in enumerate(pairs):
        assert batch.input_ids[batch.chosen_index[k]].tolist() == list(pair.prompt + pair.chosen)
        assert batch.input_ids[batch.rejected_index[k]].tolist() == list(pair.prompt + pair.rejected)


def test_collate_dtypes():
    """All tensors are int64."""
    batch = collate_pairs([DOC_PAIR], 0)
    tensors = [t for k, t in vars(batch).items() if k != "shared"] + list(vars(batch.shared).values())
    assert all(t.dtype == torch.long for t in tensors)


def test_collate_bad_padding_side():
    """padding_side other than left/right raises ValueError."""
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        collate_pairs([DOC_PAIR], 0, padding_side="middle")


def test_batch_to_cpu():
    """PreferenceBatch.to returns a new batch with equal tensors on the device."""
    batch = collate_pairs([DOC_PAIR], 0)
    moved = batch.to("cpu")
    assert isinstance(moved, PreferenceBatch) and moved is not batch
    pairs = [(getattr(moved, k), v) for k, v in vars(batch).items() if k != "shared"]
    pairs += [(getattr(moved.shared, k), v) for k, v in vars(batch.shared).items()]  # the prompts-once layout moves too
    for moved_value, value in pairs:
        assert moved_value.device.type == "cpu"
        assert_close(moved_value, value)
    assert moved.num_pairs == 1


# ---------------------------------------------------------------------------------------------
# prompt_grouped_batches


def _grouped_pairs():
    """Ten pairs over four prompts, interleaved."""
    prompts = [(1,), (2,), (1,), (3,), (2,), (1,), (4,), (3,), (4,), (1,)]
    return [TokenizedPair(p, (10 + i,), (50 + i,)) for i, p in enumerate(prompts)]


def _check_grouped(pairs, batches, batch_size):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(pairs)))  # every index exactly once
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    seen, last = set(), None
    for i in flat:  # each prompt's pairs form one contiguous run
        prompt = pairs[i].prompt
        if prompt != last:
            assert prompt not in seen
            seen.add(prompt)
            last = prompt


def test_grouped_batches_keep_order_without_seed():
    """seed=None: prompt groups in order of first appearance, pairs in file order."""
    pairs = _grouped_pairs()
    batches = prompt_grouped_batches(pairs, batch_size=4)
    assert batches == [[0, 2, 5, 9], [1, 4, 3, 7], [6, 8]]
    _check_grouped(pairs, batches, 4)


def test_grouped_batches_adjacent_already_sorted():
    """seed=None on already grouped input is the identity order."""
    pairs = [TokenizedPair((p,), (10 + i,), (50 + i,)) for i, p in enumerate([1, 1, 2, 3, 3, 3])]
    assert prompt_grouped_batches(pairs, 4) == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 20])
def test_grouped_batches_shuffled(seed, batch_size):
    """With a seed: every index once, batch sizes right, same-prompt pairs adjacent."""
    pairs = _grouped_pairs()
    _check_grouped(pairs, prompt_grouped_batches(pairs, batch_size, seed=seed), batch_size)


def test_grouped_batches_deterministic_for_seed():
    """The same seed gives the same batches; some seed differs from file order."""
    pairs = _grouped_pairs()
    assert prompt_grouped_batches(pairs, 3, seed=5) == prompt_grouped_batches(pairs, 3, seed=5)
    unseeded = prompt_grouped_batches(pairs, 3)
    assert any(prompt_grouped_batches(pairs, 3, seed=s) != unseeded for s in range(5))


def test_grouped_batches_empty():
    """No pairs give no batches."""
    assert prompt_grouped_batches([], 4, seed=0) == []


# ---------------------------------------------------------------------------------------------
# Properties

token_lists = st.lists(st.integers(1, 40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, database=None)
@given(prompt=token_lists, responses=st.lists(token_lists, min_size=1, max_size=4), data=st.data())
def test_truncate_properties(prompt, responses, data):
    """truncate: total <= max_length, prompt is a suffix of at least min(len, max_prompt_length), responses are prefixes."""
    max_length = data.draw(st.integers(2, 30))
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    new_prompt, new_responses = truncate(list(prompt), [list(r) for r in responses], max_length, max_prompt_length)
    assert len(new_responses) == len(responses)
    assert new_prompt == prompt[len(prompt) - len(new_prompt) :]
    assert len(new_prompt) >= min(len(prompt), max_prompt_length)
    for old, new in zip(responses, new_responses):
        assert new == old[: len(new)]
        assert len(new_prompt) + len(new) <= max_length
    if len(prompt) + max(map(len, responses)) <= max_length:  # fits: nothing cut
        assert (new_prompt, new_responses) == (prompt, responses)
    elif len(new_prompt) > max_prompt_length:  # prompt not at its floor: responses untouched
        assert new_responses == responses
        assert len(new_prompt) + max(map(len, responses)) == max_length


pair_strategy = st.builds(
    lambda p, c, r: TokenizedPair(tuple(p), tuple(c), tuple(r)),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
)


@settings(max_examples=150, deadline=None, database=None)
@given(pairs=st.lists(pair_strategy, min_size=1, max_size=6), side=st.sampled_from(["left", "right"]))
def test_collate_properties(pairs, side):
    """collate_pairs: shapes, masks, distinct rows, and un-padding a row recovers prompt + response."""
    batch = collate_pairs(pairs, 0, padding_side=side)
    n, width = batch.input_ids.shape
    distinct = {(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)}
    assert n == len(distinct) <= 2 * len(pairs)
    assert width == max(len(p) + len(r) for p, r in distinct)
    assert batch.attention_mask.shape == batch.completion_mask.shape == (n, width)
    assert batch.chosen_index.shape == batch.rejected_index.shape == (len(pairs),)
    assert ((batch.completion_mask == 1) <= (batch.attention_mask == 1)).all()
    assert set(batch.attention_mask.unique().tolist()) <= {0, 1}
    assert (batch.input_ids[batch.attention_mask == 0] == 0).all()
    rows = set()
    for row in range(n):
        attn = batch.attention_mask[row]
        positions = attn.nonzero().flatten().tolist()
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # contiguous
        assert positions[0] == 0 if side == "right" else positions[-1] == width - 1
        comp = batch.completion_mask[row].nonzero().flatten().tolist()
        assert comp == positions[len(positions) - len(comp) :]  # the response is the tail of the sequence
        # a row is its (prompt, response) split: equal ids with a different split are different rows
        rows.add((tuple(batch.input_ids[row][attn.bool()].tolist()), len(comp)))
    assert len(rows) == n
    for k, pair in enumerate(pairs):
        for response, index in ((pair.chosen, batch.chosen_index[k]), (pair.rejected, batch.rejected_index[k])):
            mask = batch.attention_mask[index].bool()
            assert batch.input_ids[index][mask].tolist() == list(pair.prompt + response)
            assert batch.input_ids[index][batch.completion_mask[index].bool()].tolist() == list(response)


def test_pad_shared_layout():
    """The docstring's example: contexts left-padded, continuations right-padded, each owned by its
    context; the scored sequences start from the last context token."""
    shared = pad_shared([([5, 6], [[8], [9, 10]]), ([7], [[11]])], pad_token_id=0)
    assert shared.context_ids.tolist() == [[5, 6], [0, 7]] and shared.context_mask.tolist() == [[1, 1], [0, 1]]
    assert shared.ids.tolist() == [[8, 0], [9, 10], [11, 0]] and shared.mask.tolist() == [[1, 0], [1, 1], [1, 0]]
    assert shared.owner.tolist() == [0, 0, 1]
    assert shared.input_ids.tolist() == [[6, 8, 0], [6, 9, 10], [7, 11, 0]]
    assert shared.completion_mask.tolist() == [[0, 1, 0], [0, 1, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="non-empty context"):
        pad_shared([([], [[1]])], pad_token_id=0)
