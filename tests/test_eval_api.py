"""The public evaluation API: per-pair preference results, Winogrande-style choice items, and the
building blocks exported from qadapter.eval."""

from __future__ import annotations

import pytest

import qadapter.eval
from qadapter.collate import tokenize_pair
from qadapter.config import Dial
from qadapter.data import read_records
from qadapter.errors import DataError
from qadapter.eval import (
    ChoiceItem,
    ContextChoiceItem,
    PolicySpec,
    by_category,
    choice_accuracy,
    choice_logliks,
    evaluate_preferences,
    preference_pairs,
)
from qadapter.model import QAdapterModel

from conftest import marker_records, random_adapter


@pytest.fixture(scope="module")
def qmodel(tiny_model_dir, tmp_path_factory):
    return QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path_factory.mktemp("api") / "a"), device="cpu")


def test_per_pair_results_carry_prompt_category_and_agree_with_totals(qmodel):
    """One result per record, in record order, with its prompt, origin and category; their scores and
    margins average to evaluate_preferences' totals, and by_category slices them."""
    records = read_records(marker_records(6)).records
    categories = ["even" if i % 2 == 0 else "odd" for i in range(len(records))]
    pairs = preference_pairs(qmodel, records, Dial(), categories=categories, batch_size=3)
    assert [p.index for p in pairs] == list(range(len(records)))
    assert [(p.prompt, p.origin, p.category) for p in pairs] == [(r.prompt, r.origin, c) for r, c in zip(records, categories)]
    total = evaluate_preferences(qmodel, [tokenize_pair(r, qmodel.tokenizer, qmodel.config.max_length, qmodel.config.max_prompt_length) for r in records])
    assert sum(p.score for p in pairs) / len(pairs) == pytest.approx(total.accuracy)
    assert sum(p.margin for p in pairs) / len(pairs) == pytest.approx(total.margin_mean, abs=1e-4)
    sliced = by_category(pairs)
    assert set(sliced) == {"even", "odd"} and sum(s["n_pairs"] for s in sliced.values()) == len(records)
    with pytest.raises(DataError, match="categories"):
        preference_pairs(qmodel, records, categories=["x"])


def test_context_choice_item_scores_the_fixed_continuation_after_each_context(qmodel):
    """A Winogrande-style item (options are contexts, the continuation is fixed) scores log P(continuation |
    context) per option: the same numbers as one single-choice item per context."""
    contexts = ("the cat sat on the mat because the cat", "the cat sat on the mat because the mat")
    item = ContextChoiceItem("w/0", contexts, " was tired", 0)
    singles = [ChoiceItem(f"w/0/{k}", c, (" was tired",), 0) for k, c in enumerate(contexts)]
    policies = [PolicySpec("base", base=True), PolicySpec("q")]
    got = choice_logliks(qmodel, [item, item], policies, batch_size=3)
    expected = choice_logliks(qmodel, singles, policies, batch_size=3)
    for name in got:
        assert got[name] == [[pytest.approx(s[0], abs=1e-5) for s in expected[name]]] * 2
        acc, acc_norm = choice_accuracy([item], got[name][:1])
        assert acc == acc_norm  # one continuation for every option: per-character normalisation changes nothing


def test_building_blocks_are_exported_with_docstrings():
    for name in qadapter.eval.__all__:
        obj = getattr(qadapter.eval, name)
        assert (obj.__doc__ or "").strip(), name
