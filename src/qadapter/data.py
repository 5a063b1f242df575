"""Preference data: every supported layout → one :class:`PreferenceRecord`.

Accepted layouts, detected per record at the edge (nothing downstream branches on them):

================================  =====================================================================
layout                            fields
================================  =====================================================================
explicit prompt (TRL)             ``prompt``, ``chosen``, ``rejected``: strings, or lists of
                                  ``{"role", "content"}`` messages (conversational)
implicit prompt (TRL)             ``chosen``, ``rejected`` message lists sharing their opening turns
UltraFeedback-binarized           ``prompt`` string; ``chosen``, ``rejected`` whole conversations whose
                                  shared opening turns end with that prompt as a user turn
Anthropic HH-RLHF transcripts     ``chosen``, ``rejected`` strings of ``\\n\\nHuman: …\\n\\nAssistant: …``
scored pair (DSP helpful/harmless) ``text``: [transcript, transcript], ``score``: [s, s]
multi-response (DSP domains)      ``query``, ``responses``: {style: text}; ``prefer`` picks the chosen
                                  style and every other style becomes a rejected response
================================  =====================================================================

Sources: ``.jsonl`` / ``.json`` (a list of records), optionally ``.gz``, read here; through ``datasets``:
``.parquet`` files, ``save_to_disk`` folders, folders of data files, hub names (with a split and a
config), ``Dataset``/``DatasetDict`` objects. A malformed record raises :class:`DataError` naming the
file and line, or the source and row (``skip_invalid=True`` skips it instead and counts it).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import os
import json
import math
import random
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

from .errors import DataError

Message = dict[str, str]
Turns = Union[str, list[Message]]  # plain text, or a conversation
ROLES = ("system", "user", "assistant", "tool")
# Far beyond any context a pair is trained on (it is cut to max_length tokens), and small enough that
# tokenizing it cannot exhaust memory: one 200 MB record once drove the tokenizer past 12 GB.
MAX_RECORD_CHARS = 1_000_000
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass(frozen=True)
class PreferenceRecord:
    """One comparison: for ``prompt``, ``chosen`` is preferred over ``rejected``.

    Either all three are strings (plain text, concatenated as prompt + response) or all three
    are message lists (rendered with the tokenizer's chat template). ``origin`` is "file:line".
    """

    prompt: Turns
    chosen: Turns
    rejected: Turns
    origin: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def prompt_key(self) -> str:
        """A stable text key for the prompt, used to split data by prompt."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


@dataclass
class LoadReport:
    """What :func:`read_records` kept and skipped."""

    records: list[PreferenceRecord]
    skipped: list[str] = field(default_factory=list)  # "origin: reason" per skipped record


# ---------------------------------------------------------------------------------------------
# One raw record → PreferenceRecords


def _check_messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a non-empty list of messages")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"'{what}[{i}]' must be an object with string 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"'{what}[{i}]' has role {msg['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{what}' must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{what}' is empty")
    return value


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an Anthropic HH-RLHF transcript into messages.

    >>> parse_hh_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def _split_common_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two conversations into their shared opening turns and the diverging rest."""
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == min(len(chosen), len(rejected)):
        raise ValueError("one conversation is a prefix of the other, so they share no point where they diverge")
    prompt, chosen_rest, rejected_rest = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise ValueError("chosen and rejected share no opening turn to use as the prompt")
    _check_conversation(prompt, chosen_rest, rejected_rest)
    return prompt, chosen_rest, rejected_rest


def _check_turn_order(turns: list[Message], what: str) -> None:
    """Chat templates expect: an optional system turn first, then a user turn, then user and assistant
    turns alternating (tool results may follow an assistant turn)."""
    roles = [m["role"] for m in turns]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        role, previous = roles[i], roles[i - 1] if i > start else None
        if role == "system":
            raise ValueError(f"'{what}' has a system turn at position {i}; only the first turn may be a system turn")
        if previous is None and role != "user":
            raise ValueError(f"'{what}' must open with a user turn (after an optional system turn), not {role!r}")
        if role == previous and role != "tool":
            raise ValueError(f"'{what}' has two {role} turns in a row (positions {i - 1} and {i})")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise ValueError(f"'{what}' has a tool turn at position {i} that does not follow an assistant turn")


def _check_conversation(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> None:
    """Turns in an order chat templates accept; the prompt ends with a user (or tool) turn and says
    something; each response starts with an assistant turn and says something."""
    if prompt[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"the prompt must end with a user turn, not {prompt[-1]['role']!r}")
    for name, rest in (("chosen", chosen), ("rejected", rejected)):
        if rest[0]["role"] != "assistant":
            raise ValueError(f"'{name}' must start with an assistant turn, not {rest[0]['role']!r}")
        if not any(m["content"].strip() for m in rest):
            raise ValueError(f"the {name} response is empty")
    _check_turn_order(prompt + chosen, "prompt + chosen")
    _check_turn_order(prompt + rejected, "prompt + rejected")
    if not any(m["content"].strip() for m in prompt if m["role"] != "system"):
        raise ValueError("the prompt is empty")


def _conversation(value: Any, what: str) -> list[Message]:
    """A message list, or an HH transcript string parsed into one."""
    if isinstance(value, str):
        if not _HH_TURN.search(value):
            raise ValueError(
                f"'{what}' is plain text without an explicit 'prompt'; give a 'prompt' field, "
                "message lists, or an HH-RLHF transcript ('\\n\\nHuman: … \\n\\nAssistant: …')"
            )
        return parse_hh_transcript(value)
    return _check_messages(value, what)


def _from_pair(chosen: Any, rejected: Any, origin: str) -> PreferenceRecord:
    prompt, c, r = _split_common_prompt(_conversation(chosen, "chosen"), _conversation(rejected, "rejected"))
    return PreferenceRecord(prompt, c, r, origin)


def _from_explicit(obj: dict[str, Any], origin: str) -> PreferenceRecord:
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, "prompt")
        chosen, rejected = (
            [{"role": "assistant", "content": _check_text(obj[k], k)}] if isinstance(obj[k], str) else _check_messages(obj[k], k)
            for k in ("chosen", "rejected")
        )
        _check_conversation(prompt, chosen, rejected)
        return PreferenceRecord(prompt, chosen, rejected, origin)
    prompt = _check_text(prompt, "prompt")
    if isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list) and _opens_with_user(obj["chosen"]):
        return _from_text_prompt_conversations(prompt, obj["chosen"], obj["rejected"], origin)
    for key in ("chosen", "rejected"):
        if isinstance(obj[key], list):
            raise ValueError(
                f"'{key}' is a message list but 'prompt' is plain text; give the prompt as messages too, "
                "or both responses as whole conversations that open with the prompt as a user turn"
            )
    return PreferenceRecord(prompt, _check_text(obj["chosen"], "chosen"), _check_text(obj["rejected"], "rejected"), origin)


def _opens_with_user(turns: list[Any]) -> bool:
    """Whether a message list is a whole conversation (it opens with a system or user turn) rather than
    only the response's turns."""
    return bool(turns) and isinstance(turns[0], dict) and turns[0].get("role") in ("system", "user")


def _from_text_prompt_conversations(prompt: str, chosen: list[Any], rejected: list[Any], origin: str) -> PreferenceRecord:
    """UltraFeedback-binarized: a plain-text ``prompt`` beside whole conversations that repeat it as their
    opening turns. The shared opening turns are the prompt (as TRL takes them); the text must be their last
    user turn, so a record whose two fields disagree is refused rather than trained on either."""
    turns, c, r = _split_common_prompt(_check_messages(chosen, "chosen"), _check_messages(rejected, "rejected"))
    asked = [m["content"] for m in turns if m["role"] == "user"]
    if not asked or asked[-1].strip() != prompt.strip():
        raise ValueError("'prompt' differs from the last user turn that 'chosen' and 'rejected' share")
    return PreferenceRecord(turns, c, r, origin)


def _from_scored(obj: dict[str, Any], origin: str) -> PreferenceRecord:
    text, score = obj["text"], obj.get("score", [1.0, 0.0])
    if not (isinstance(text, list) and len(text) == 2 and isinstance(score, list) and len(score) == 2):
        raise ValueError("'text' and 'score' must be lists of two")
    # bool is an int subclass and json reads NaN/Infinity: neither orders a pair (isfinite overflows on huge ints)
    numbers = all((isinstance(s, int) and not isinstance(s, bool)) or (isinstance(s, float) and math.isfinite(s)) for s in score)
    if not numbers or score[0] == score[1]:
        raise ValueError("'score' must hold two different numbers")
    better, worse = (text[0], text[1]) if score[0] > score[1] else (text[1], text[0])
    return _from_pair(better, worse, origin)


def _from_multi_response(obj: dict[str, Any], origin: str, prefer: str | None) -> list[PreferenceRecord]:
    responses = obj["responses"]
    if not isinstance(responses, dict) or not responses:
        raise ValueError("'responses' must be an object {style: text}")
    if prefer is None:
        raise ValueError(f"records with 'responses' need a preferred style (prefer=...); styles: {', '.join(sorted(responses))}")
    if prefer not in responses:
        raise ValueError(f"no response for preferred style {prefer!r}; styles: {', '.join(sorted(responses))}")
    prompt = [{"role": "user", "content": _check_text(obj["query"], "query")}]
    chosen = [{"role": "assistant", "content": _check_text(responses[prefer], f"responses.{prefer}")}]
    for style, text in responses.items():
        if not isinstance(text, str):
            raise ValueError(f"'responses.{style}' must be a string, got {type(text).__name__}")
    # An empty response, or one equal to the preferred text, expresses no preference: left out.
    records = [
        PreferenceRecord(prompt, chosen, [{"role": "assistant", "content": text}], origin)
        for style, text in sorted(responses.items())
        if style != prefer and text.strip() and text != responses[prefer]
    ]
    return records


def _check_unicode(rec: PreferenceRecord) -> None:
    # json reads "\ud800" escapes into strings that tokenizers and hashing cannot encode
    try:
        json.dumps([rec.prompt, rec.chosen, rec.rejected], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds an unpaired surrogate (a '\\ud800'-style escape), which is not valid Unicode") from None


def _check_size(rec: PreferenceRecord) -> None:
    texts = [t if isinstance(t, str) else "".join(m["content"] for m in t) for t in (rec.prompt, rec.chosen, rec.rejected)]
    size = sum(map(len, texts))
    if size > MAX_RECORD_CHARS:
        raise ValueError(f"the record holds {size:,} characters, more than the {MAX_RECORD_CHARS:,} qadapter reads per record")


def parse_record(obj: Any, origin: str, prefer: str | None = None) -> list[PreferenceRecord]:
    """Normalise one raw record (any accepted layout) into PreferenceRecords.

    Raises :class:`DataError` with ``origin`` and the reason if the record is malformed.
    """
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
        if "responses" in obj and "query" in obj:
            records = _from_multi_response(obj, origin, prefer)
        elif "text" in obj:
            records = [_from_scored(obj, origin)]
        elif "chosen" in obj and "rejected" in obj:
            records = [_from_explicit(obj, origin) if "prompt" in obj else _from_pair(obj["chosen"], obj["rejected"], origin)]
        else:
            raise ValueError(
                f"unrecognised record with fields {sorted(obj)}; expected prompt/chosen/rejected, "
                "chosen/rejected, text/score, or query/responses"
            )
        for rec in records:
            if rec.chosen == rec.rejected:
                raise ValueError("chosen and rejected are identical")
            _check_unicode(rec)
            _check_size(rec)
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{origin}: {exc}") from None
    return records


# ---------------------------------------------------------------------------------------------
# Sources → raw records with origins


def _decode(raw: bytes, where: str, unit: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of the {unit})") from None


def _raw_from_file(path: Path) -> Iterator[tuple[Any, str, str | None]]:
    """(record, origin, error) per record; a line that is not a JSON object comes with its error
    so the caller can stop or skip it."""
    inner_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            if inner_suffix == ".json":
                try:
                    data = json.loads(_decode(handle.read(), str(path), "file"))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
                except DataError:
                    raise
                except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, nesting too deep
                    raise DataError(f"{path}: invalid JSON ({exc})") from None
                if isinstance(data, dict):  # {"data": [...]} or a single record
                    data = data.get("data", [data])
                if not isinstance(data, list):
                    raise DataError(f"{path}: expected a JSON list of records")
                for i, obj in enumerate(data):
                    yield obj, f"{path}[{i}]", None
                return
            for lineno, raw in enumerate(handle, start=1):
                origin = f"{path}:{lineno}"
                try:
                    line = _decode(raw, origin, "line")
                    if not line.strip():
                        continue
                    yield json.loads(line), origin, None
                except json.JSONDecodeError as exc:
                    yield None, origin, f"{origin}: invalid JSON ({exc.msg})"
                except DataError as exc:
                    yield None, origin, str(exc)
                except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, nesting too deep
                    yield None, origin, f"{origin}: invalid JSON ({exc})"
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _import_datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where} needs `pip install datasets`") from None
    return datasets


def _rows(data: Any, where: str, split: str | None) -> Iterator[tuple[Any, str, str | None]]:
    """Rows of a ``datasets.Dataset`` (or any iterable of records), or of one split of a ``DatasetDict``
    (any mapping of split names to rows): ``train`` unless ``split`` names another."""
    if isinstance(data, Mapping):
        chosen = split or "train"
        if chosen not in data:
            raise DataError(f"{where}: no split {chosen!r}; splits: {', '.join(map(str, data))}")
        data, where = data[chosen], f"{where}[{chosen}]"
    elif split is not None:
        raise DataError(f"{where}: holds a single split, so split {split!r} cannot be chosen")
    for i, row in enumerate(data):
        yield row, f"{where}[{i}]", None


def _load_dataset_split(name: str, split: str | None, config: str | None, needs: str) -> Iterator[tuple[Any, str, str | None]]:
    """Rows of one split (default ``train``) of ``datasets.load_dataset(name, config)``; a missing split
    or config is reported by ``datasets`` with the available ones."""
    datasets = _import_datasets(f"{name}: {needs}")
    split = split or "train"
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types; the message is what matters
        raise DataError(f"{name}: could not load with datasets.load_dataset ({exc})") from None
    for i, row in enumerate(rows):
        yield row, f"{name}[{split}][{i}]", None


def _raw_from_datasets(name: str, split: str | None, config: str | None) -> Iterator[tuple[Any, str, str | None]]:
    """A dataset on the hub, by name."""
    return _load_dataset_split(name, split, config, "not a file, and reading a datasets source")


def _raw_from_folder(path: Path, split: str | None, config: str | None) -> Iterator[tuple[Any, str, str | None]]:
    """A ``save_to_disk`` folder (a Dataset or a DatasetDict), else a folder of data files for ``load_dataset``."""
    if not any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        yield from _load_dataset_split(str(path), split, config, "reading a folder")
        return
    if config is not None:
        raise DataError(f"{path}: a save_to_disk folder has no configs, so config {config!r} cannot be chosen")
    datasets = _import_datasets(f"{path}: reading a save_to_disk folder")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged or foreign folder; the message is what matters
        raise DataError(f"{path}: could not load with datasets.load_from_disk ({exc})") from None
    yield from _rows(data, str(path), split)


def _raw_from_parquet(path: Path) -> Iterator[tuple[Any, str, str | None]]:
    datasets = _import_datasets(f"{path}: reading a Parquet file")
    try:
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # not Parquet, or a broken file
        raise DataError(f"{path}: could not load with datasets.load_dataset ({exc})") from None
    yield from _rows(data, str(path), None)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _local_kind(path: Path) -> str | None:
    """"file" or "folder" for what can be read, None where nothing exists, else why it cannot be read."""
    try:
        mode = path.stat().st_mode  # follows symlinks; a FIFO must never be opened (it blocks)
    except FileNotFoundError:
        return None if not path.is_symlink() else "a symlink to nothing"
    except OSError as exc:
        return "a symlink loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return "file" if stat.S_ISREG(mode) else "folder"
    return "is not a regular file (a FIFO, socket or device)"


def _looks_like_hub_id(name: str) -> bool:
    """``name`` or ``namespace/name`` with no file suffix and no local folder for the namespace:
    only such names are looked up with ``datasets``; anything else is a missing file."""
    if not _HUB_ID.fullmatch(name) or Path(name).suffix in (".json", ".jsonl", ".gz", ".parquet", ".csv"):
        return False
    namespace = name.split("/")[0]
    return "/" not in name or not Path(namespace).is_dir()


def read_records(
    source: str | Path | Iterable[dict[str, Any]] | Mapping[str, Iterable[dict[str, Any]]],
    *,
    prefer: str | None = None,
    split: str | None = None,
    config: str | None = None,
    skip_invalid: bool = False,
) -> LoadReport:
    """Read preference records from a file (.jsonl/.json(.gz), .parquet), a ``save_to_disk`` folder, a
    folder of data files or a hub name (read by ``datasets``), a ``datasets.Dataset`` or any iterable of
    dicts, or a ``DatasetDict`` (any mapping of split names to rows).

    ``split`` picks one split where there are several (default ``train``); ``config`` picks a
    ``datasets`` configuration of a hub name or folder. Both are refused where there is nothing to pick.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        local = _local_kind(path)
        if local == "file":
            if split is not None or config is not None:
                raise DataError(f"{path}: a single file has no splits or configs to choose from")
            raw: Iterable[tuple[Any, str, str | None]] = _raw_from_parquet(path) if path.suffix == ".parquet" else _raw_from_file(path)
        elif local == "folder":
            raw = _raw_from_folder(path, split, config)
        elif local is not None:
            raise DataError(f"{path}: {local}")
        elif isinstance(source, Path) or not _looks_like_hub_id(source):
            raise DataError(f"{path}: no such data file")
        else:
            raw = _raw_from_datasets(str(source), split, config)
    elif config is not None:
        raise DataError(f"config {config!r}: only a datasets name or folder has configs to choose from")
    else:
        raw = _rows(source, "<records>", split)
    report = LoadReport(records=[])
    for obj, origin, error in raw:
        try:
            if error is not None:
                raise DataError(error)
            records = parse_record(obj, origin, prefer)
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped.append(str(exc))
            continue
        if not records:  # a multi-response record whose other responses are all empty or equal
            report.skipped.append(f"{origin}: no response differs from the preferred one")
        report.records.extend(records)
    if not report.records:
        raise DataError(f"{source}: no usable preference records" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    return report


def split_by_prompt(
    records: list[PreferenceRecord], eval_fraction: float, seed: int = 0
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Split into (train, eval) so that no prompt appears in both.

    Several pairs often share a prompt (DSP has four per query); splitting pairs would leak
    prompts into evaluation. Prompts are shuffled with ``seed`` and the last ``eval_fraction``
    of them go to evaluation.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    keys = sorted({r.prompt_key for r in records}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    if n_eval >= len(keys):
        raise DataError(f"only {len(keys)} distinct prompt(s): too few to hold some out for evaluation")
    eval_keys = set(keys[len(keys) - n_eval :])
    train = [r for r in records if r.prompt_key not in eval_keys]
    held_out = [r for r in records if r.prompt_key in eval_keys]
    return train, held_out


def first_prompts(records: list[PreferenceRecord], max_pairs: int | None) -> list[PreferenceRecord]:
    """The first whole prompts whose pairs fit in ``max_pairs`` (at least one prompt): a slice that
    never cuts a prompt's pairs apart."""
    if max_pairs is None or len(records) <= max_pairs:
        return records
    kept: list[PreferenceRecord] = []
    seen: set[str] = set()
    for record in records:
        if record.prompt_key not in seen and len(kept) >= max_pairs:
            break
        seen.add(record.prompt_key)
        kept.append(record)
    return kept


BUNDLED_DATA = Path(__file__).with_name("bundled_data")  # the data the default commands read, shipped with the package
COMPRESSED = (".gz", ".bz2")


def default_data_dir() -> Path:
    """The folder the default commands read their data from: ``$QADAPTER_DATA_DIR`` when set (a
    fuller or newer copy, e.g. the project's optional ``../shared/data``), else the data shipped
    inside the package (``qadapter/bundled_data``, see its README for sources and licences)."""
    chosen = os.environ.get("QADAPTER_DATA_DIR")
    if not chosen:
        return BUNDLED_DATA
    if not Path(chosen).is_dir():
        raise DataError(f"QADAPTER_DATA_DIR={chosen}: not a folder")
    return Path(chosen)


def data_file(root: str | Path, relative: str) -> Path:
    """``root/relative``, or its compressed copy (``.gz``/``.bz2``) where only that exists."""
    plain = Path(root) / relative
    for candidate in (plain, *(plain.with_name(plain.name + suffix) for suffix in COMPRESSED)):
        if candidate.is_file():
            return candidate
    raise DataError(f"{plain}: data file not found (nor a .gz/.bz2 copy of it)")


def open_text(path: Path, newline: str | None = None) -> IO[str]:
    """Open a (possibly gzip- or bzip2-compressed) UTF-8 text file."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline=newline)
