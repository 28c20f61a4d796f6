"""Stimulus sets: sentences, the target word in each, and the category it belongs to.

A stimulus file is JSONL, one object a line, every field a string:
    text      the sentence the model reads
    word      the target word; it must occur in `text` as a whole word (case-sensitive)
    category  the label analyses try to read out of the activations
    frame     optional: which sentence frame the text was built from
    group     optional, defaults to `word`: stimuli sharing a group stay on one side of every split

Loading checks every line and reports all bad ones at once, by line number. Pure Python and NumPy:
nothing here imports mlx, so analyses can read stimulus sets freely.

A text corpus (`load_texts`: .txt one text a line, or .jsonl with a `text` field) is a stimulus set of
kind "texts": no target word, no category, each text its own split group. It is what token-level
recordings (`--pool all`) of running text are made from.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxscanError

__all__ = ["Stimulus", "StimulusSet", "StimuliError", "find_word", "load_stimuli", "load_texts", "read_texts"]

REQUIRED_FIELDS = ("text", "word", "category")
OPTIONAL_FIELDS = ("frame", "group")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
MAX_LISTED = 50  # bad lines shown in one error; a file that is wrong throughout needs no more to be fixed


class StimuliError(MlxscanError):
    """A stimulus file or record list with bad lines: a summary line, then one line per bad line.

    Several lines, unlike other MlxscanErrors, because fixing a file needs every bad line in one go.
    """


@dataclass(frozen=True)
class Stimulus:
    text: str
    word: str | None  # None in a text corpus
    category: str | None  # None in a text corpus
    frame: str | None
    group: str
    word_span: tuple[int, int] | None  # characters [start, end) of the word's first whole-word occurrence in `text`
    line: int  # 1-based line in the file (or position in the record list), for messages


@dataclass(frozen=True)
class StimulusSet:
    path: Path | None  # None for a set built in memory
    stimuli: tuple[Stimulus, ...]
    sha256: str  # of the canonical JSONL: the same stimuli have one identity however the file is formatted

    def __len__(self) -> int:
        return len(self.stimuli)

    @property
    def kind(self) -> str:
        """"stimuli" (text, target word, category) or "texts" (a corpus: text only)."""
        return "texts" if self.stimuli[0].word is None else "stimuli"

    def _needs_categories(self) -> None:
        if self.kind == "texts":
            raise MlxscanError("these are plain texts (a corpus) with no categories; "
                               "use a stimulus set with `word` and `category` fields for this analysis")

    def __iter__(self):
        return iter(self.stimuli)

    def __getitem__(self, index):
        return self.stimuli[index]

    @property
    def texts(self) -> list[str]:
        return [stimulus.text for stimulus in self.stimuli]

    @property
    def words(self) -> list[str]:
        return [stimulus.word for stimulus in self.stimuli]

    @property
    def categories(self) -> list[str]:
        """The distinct categories, sorted; `labels` index into this list."""
        self._needs_categories()
        return sorted({stimulus.category for stimulus in self.stimuli})

    @property
    def labels(self) -> np.ndarray:
        """[n_stimuli] int64: each stimulus's category as an index into `categories`."""
        self._needs_categories()
        index = {category: n for n, category in enumerate(self.categories)}
        return np.array([index[stimulus.category] for stimulus in self.stimuli], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """[n_stimuli] str: split groups, for grouped cross-validation (e.g. scikit-learn's GroupKFold)."""
        return np.array([stimulus.group for stimulus in self.stimuli], dtype=str)

    def to_jsonl(self) -> str:
        """The set as canonical JSONL (fixed field order, `group` always written); loads back to the same stimuli."""
        return _canonical_jsonl(self.stimuli)

    @classmethod
    def from_records(cls, records: list[dict]) -> StimulusSet:
        """A set built in memory, validated as a file would be (record n is reported as "record n")."""
        checker = _Checker(unit="record")
        for number, record in enumerate(records, start=1):
            checker.check(number, record)
        stimuli = checker.result("records")
        if not stimuli:
            raise MlxscanError("no stimuli: from_records needs at least one record")
        digest = hashlib.sha256(_canonical_jsonl(stimuli).encode("utf-8")).hexdigest()
        return cls(path=None, stimuli=stimuli, sha256=digest)


def load_stimuli(path: str | Path) -> StimulusSet:
    """Read and validate a stimulus JSONL file; every bad line is reported in one StimuliError."""
    path = Path(path)
    if not path.exists():
        raise MlxscanError(f"stimulus file {path} does not exist")
    if path.is_dir():
        raise MlxscanError(f"{path} is a directory; give a stimulus .jsonl file")
    data = path.read_bytes()
    checker = _Checker(unit="line")
    # Split bytes, not text, so that a bad byte is reported on its own line instead of failing the whole file.
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            checker.bad(number, f"not UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1}); "
                                "save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            checker.bad(number, f"invalid JSON ({error.msg} at column {error.colno})")
            continue
        checker.check(number, record)
    stimuli = checker.result(str(path))
    if not stimuli:
        raise MlxscanError(f"{path} holds no stimuli; write one JSON object a line")
    digest = hashlib.sha256(_canonical_jsonl(stimuli).encode("utf-8")).hexdigest()
    return StimulusSet(path=path, stimuli=stimuli, sha256=digest)


def find_word(word: str, text: str) -> tuple[int, int] | None:
    """The span of `word`'s first whole-word occurrence in `text`, or None ("cat" is not in "concatenate")."""
    # Lookarounds rather than \b, so words that begin or end with punctuation ("C++") still match.
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)
    return match.span() if match else None


def _problems(record) -> list[str]:
    """What is wrong with one parsed record (empty when nothing is)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}; got {_json_type(record)}"]
    problems = [f"missing field '{name}'" for name in REQUIRED_FIELDS if name not in record]
    problems += [f"unknown field '{name}' (fields are: {', '.join(FIELDS)})" for name in record if name not in FIELDS]
    for name in (name for name in FIELDS if name in record):
        value = record[name]
        if not isinstance(value, str):
            problems.append(f"field '{name}' must be a string, not {_json_type(value)}")
        elif not value.strip():
            problems.append(f"empty {name}")
    word, text = record.get("word"), record.get("text")
    if problems or not (isinstance(word, str) and isinstance(text, str)):
        return problems
    if word != word.strip():
        return [f"target word {word!r} has leading or trailing spaces"]
    if find_word(word, text) is None:
        return [f"target word {word!r} does not occur in the text (as a whole word, case-sensitive)"]
    return []


class _Checker:
    """Gathers the valid stimuli and the problems of every bad line, so all are reported at once."""

    def __init__(self, unit: str):
        self.unit = unit  # "line" in a file, "record" in a list
        self.stimuli: list[Stimulus] = []
        self.problems: list[tuple[int, str]] = []
        self.seen: dict[tuple[str, str], int] = {}  # (text, word) -> where it first appeared

    def bad(self, number: int, problem: str) -> None:
        self.problems.append((number, problem))

    def check(self, number: int, record) -> None:
        found = _problems(record)
        if found:
            return self.bad(number, "; ".join(found))
        key = (record["text"], record["word"])
        if key in self.seen:
            return self.bad(number, f"duplicate of {self.unit} {self.seen[key]} (same text and word)")
        self.seen[key] = number
        self.stimuli.append(Stimulus(text=record["text"], word=record["word"], category=record["category"],
                                     frame=record.get("frame"), group=record.get("group", record["word"]),
                                     word_span=find_word(record["word"], record["text"]), line=number))

    def result(self, source: str) -> tuple[Stimulus, ...]:
        """The stimuli, or a StimuliError listing every bad line (the first MAX_LISTED of them)."""
        if self.problems:
            count, unit = len(self.problems), self.unit
            lines = [f"{source}: {count} bad {unit}{'s' if count != 1 else ''} (fix them and run again)"]
            lines += [f"  {unit} {number}: {problem}" for number, problem in self.problems[:MAX_LISTED]]
            if count > MAX_LISTED:
                lines.append(f"  ... and {count - MAX_LISTED} more bad {unit}s")
            raise StimuliError("\n".join(lines))
        return tuple(self.stimuli)


def _canonical_jsonl(stimuli) -> str:
    """Fields in a fixed order, `frame` left out when absent, `group` always written."""
    lines = []
    for stimulus in stimuli:
        if stimulus.word is None:
            lines.append(json.dumps({"text": stimulus.text}, ensure_ascii=False) + "\n")
            continue
        record = {"text": stimulus.text, "word": stimulus.word, "category": stimulus.category}
        if stimulus.frame is not None:
            record["frame"] = stimulus.frame
        record["group"] = stimulus.group
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _json_type(value) -> str:
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_texts(path: str | Path) -> list[str]:
    """Texts from a .txt file (one a line) or a .jsonl file (field `text`); bad lines are errors."""
    path = Path(path)
    if not path.exists():
        raise MlxscanError(f"texts file {path} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise MlxscanError(f"{path}: texts must be a .txt file (one text a line) or .jsonl (field \"text\")")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise MlxscanError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from error
    texts = []
    for number, line in enumerate(lines, start=1):
        if path.suffix == ".jsonl":
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MlxscanError(f"{path}:{number}: invalid JSON ({error.msg})") from error
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MlxscanError(f"{path}:{number}: each line needs a string field \"text\"")
        else:
            text = line
        if not text.strip():
            raise MlxscanError(f"{path}:{number}: empty text; remove the line or give it text")
        texts.append(text)
    if not texts:
        raise MlxscanError(f"{path} holds no texts")
    return texts


def load_texts(path: str | Path) -> StimulusSet:
    """A text corpus as a stimulus set of kind "texts": each text its own stimulus and split group."""
    texts = read_texts(path)
    stimuli = tuple(Stimulus(text=text, word=None, category=None, frame=None, group=f"text {number}",
                             word_span=None, line=number) for number, text in enumerate(texts, start=1))
    digest = hashlib.sha256(_canonical_jsonl(stimuli).encode("utf-8")).hexdigest()
    return StimulusSet(path=Path(path), stimuli=stimuli, sha256=digest)


def meaningless_labels(stimuli: StimulusSet, seed: int = 0) -> StimulusSet:
    """The same stimuli regrouped into categories that mean nothing: the negative control of a study.

    Each real category's words are shuffled and dealt in turn to G groups, G the largest number at most
    the number of categories that divides every category's word count, so every group holds the same
    number of words of every real category. A group label then carries no meaning: no claim that
    depends on the labels may be supported on it. Words stay whole (all their frames go together).
    """
    stimuli._needs_categories()
    words_of: dict[str, list[str]] = {}
    for stimulus in stimuli:
        words = words_of.setdefault(stimulus.category, [])
        if stimulus.group not in words:
            words.append(stimulus.group)
    counts = sorted({len(words) for words in words_of.values()})
    n_groups = max((g for g in range(2, len(words_of) + 1) if all(count % g == 0 for count in counts)), default=0)
    if n_groups < 2:
        raise MlxscanError(f"the categories hold {', '.join(map(str, counts))} words: no split into 2 or more groups "
                           "gives every group the same number of words of each category; make the counts equal")
    rng = np.random.default_rng([seed, 21])
    group_of = {}
    for category in sorted(words_of):
        for position, word in enumerate(rng.permutation(sorted(words_of[category]))):
            group_of[str(word)] = f"group{position % n_groups + 1}"
    records = [{"text": s.text, "word": s.word, "category": group_of[s.group], "group": s.group,
                **({"frame": s.frame} if s.frame is not None else {})} for s in stimuli]
    return StimulusSet.from_records(records)
