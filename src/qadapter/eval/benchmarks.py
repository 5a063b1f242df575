"""Local copies of standard benchmarks → uniform items, prompted as lm-evaluation-harness does.

Multiple choice is scored by the log-likelihood of each continuation given the context (``acc``)
and by that log-likelihood per byte of the continuation (``acc_norm``); GSM8K by the final number of
a greedy generation. Subsets are a fixed, seeded sample of each file, so every policy sees the same
items with the same prompts.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..data import data_file, open_text
from ..errors import DataError

# Items per benchmark by default: one adapter (its base rows included) of the bundled 135M model in
# about ten minutes on two CPU cores, from measured seconds per item (≈0.66 ARC-Easy/PIQA, 1.9 HellaSwag,
# 1.5 BoolQ, 3.1 MMLU, 12 GSM8K), with most items where the base is above chance.
DEFAULT_SIZES = {"arc_easy": 200, "piqa": 150, "hellaswag": 50, "boolq": 40, "mmlu": 40, "gsm8k": 10}
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25, "boolq": 0.5, "mmlu": 0.25, "gsm8k": 0.0}
GENERATIVE = {"gsm8k"}  # answered by generation; the rest by log-likelihood of each choice


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: ``context`` + each of ``choices`` (with its leading space)."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ContextChoiceItem:
    """A multiple-choice question whose options are contexts and whose continuation is fixed
    (Winogrande-style: the blank filled by each option, then the same rest of the sentence): each of
    ``contexts`` + ``continuation`` (with its leading space), scored on the continuation's tokens."""

    id: str
    contexts: tuple[str, ...]
    continuation: str
    gold: int


@dataclass(frozen=True)
class GenerationItem:
    """A question answered by generation; ``answer`` is the reference final answer."""

    id: str
    prompt: str
    answer: str


def _jsonl(root: Path, relative: str) -> list[dict]:
    with open_text(data_file(root, relative)) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picked]


def _arc(root: Path, name: str) -> list[ChoiceItem]:
    rows = _jsonl(root, f"arc/{name}.jsonl")
    return [ChoiceItem(f"{name}/{i}", f"{r['query']}\nAnswer:", tuple(f" {c}" for c in r["choices"]), r["gold"]) for i, r in enumerate(rows)]


def arc_easy(root: Path) -> list[ChoiceItem]:
    return _arc(root, "arc_easy")


def arc_challenge(root: Path) -> list[ChoiceItem]:
    return _arc(root, "arc_challenge")


def boolq(root: Path) -> list[ChoiceItem]:
    rows = _jsonl(root, "boolq/boolq.jsonl")
    return [ChoiceItem(f"boolq/{i}", f"{r['query']}\nAnswer:", tuple(f" {c}" for c in r["choices"]), r["gold"]) for i, r in enumerate(rows)]


def piqa(root: Path) -> list[ChoiceItem]:
    rows = _jsonl(root, "piqa/valid.jsonl")
    labels = data_file(root, "piqa/valid-labels.lst").read_text().split()
    return [
        ChoiceItem(f"piqa/{i}", f"Question: {r['goal']}\nAnswer:", (f" {r['sol1']}", f" {r['sol2']}"), int(label))
        for i, (r, label) in enumerate(zip(rows, labels, strict=True))
    ]


def hellaswag(root: Path) -> list[ChoiceItem]:
    with open_text(data_file(root, "hellaswag/hellaswag_val_full.txt")) as handle:
        lines = handle.read().split("\n")
    items = []
    for i in range(len(lines) // 6):  # six lines per item: context, gold, four endings
        ctx, gold, *endings = lines[6 * i : 6 * i + 6]
        items.append(ChoiceItem(f"hellaswag/{i}", ctx, tuple(f" {e}" for e in endings), int(gold)))
    return items


def mmlu(root: Path) -> list[ChoiceItem]:
    items = []
    for path in sorted((root / "mmlu" / "test").glob("*_test.csv*")):
        subject = path.name[: path.name.index("_test.csv")].replace("_", " ")
        with open_text(path, newline="") as handle:
            for j, row in enumerate(csv.DictReader(handle)):
                options = "".join(f"\n{letter}. {row[f'choice{k}']}" for k, letter in enumerate("ABCD"))
                context = f"The following are multiple choice questions (with answers) about {subject}.\n\n{row['question']}{options}\nAnswer:"
                items.append(ChoiceItem(f"mmlu/{path.stem}/{j}", context, (" A", " B", " C", " D"), int(row["answer"])))
    if not items:
        raise DataError(f"{root / 'mmlu' / 'test'}: no MMLU test files found")
    return items


def gsm8k(root: Path) -> list[GenerationItem]:
    rows = _jsonl(root, "gsm8k/test.jsonl")
    return [GenerationItem(f"gsm8k/{i}", f"Question: {r['question']}\nAnswer:", r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


LOADERS = {"arc_easy": arc_easy, "arc_challenge": arc_challenge, "piqa": piqa, "hellaswag": hellaswag, "boolq": boolq, "mmlu": mmlu, "gsm8k": gsm8k}


def load_benchmark(name: str, root: str | Path, n: int | None = None, seed: int = 0) -> list:
    """The first ``n`` items of a seeded sample of benchmark ``name`` from the data folder ``root``."""
    if name not in LOADERS:
        raise DataError(f"unknown benchmark {name!r}; available: {', '.join(LOADERS)}")
    return _sample(LOADERS[name](Path(root)), n, seed)


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators (GSM8K's answer convention).

    >>> final_number("She pays 3 * 2 = 6 dollars, so 1,200 in total.")
    '1200'
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value
