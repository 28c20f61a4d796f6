"""Stimulus sets: the shipped categories set, its generator, and validation that reports every bad line.

Fast and model-free: nothing here imports mlx.
"""

import ast
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxscan.errors import MlxscanError
from mlxscan.stimuli import StimuliError, StimulusSet, find_word, load_stimuli, load_texts

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "stimuli" / "categories.jsonl"


def _generator():
    spec = importlib.util.spec_from_file_location("make_categories", ROOT / "scripts" / "make_categories.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path, lines: list[str], name="stimuli.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _record(text="The next word is cat.", word="cat", category="animals", **extra) -> str:
    return json.dumps({"text": text, "word": word, "category": category, **extra})


# The shipped set


def test_shipped_set_has_10_categories_of_12_words_in_10_frames():
    stimuli = load_stimuli(SHIPPED)
    assert len(stimuli) == 1200
    assert len(stimuli.categories) == 10
    assert np.bincount(stimuli.labels).tolist() == [120] * 10
    assert len(set(stimuli.words)) == 120
    assert {s.frame for s in stimuli} == {f"f{n:02d}" for n in range(1, 11)}
    for category in stimuli.categories:
        in_category = [s for s in stimuli if s.category == category]
        assert len({s.word for s in in_category}) == 12
        assert all(re.fullmatch(r"[a-z]+", s.word) for s in in_category)


def test_shipped_words_keep_one_group_and_one_category():
    stimuli = load_stimuli(SHIPPED)
    for word in set(stimuli.words):
        mine = [s for s in stimuli if s.word == word]
        assert len(mine) == 10
        assert {s.group for s in mine} == {word}
        assert len({s.category for s in mine}) == 1  # no word sits in two categories
    assert (stimuli.groups == np.array(stimuli.words)).all()


def test_shipped_spans_point_at_the_slot_the_word_was_put_in():
    frames = _generator().FRAMES
    stimuli = load_stimuli(SHIPPED)
    for s in stimuli:
        start, end = s.word_span
        assert s.text[start:end] == s.word
        assert start == frames[s.frame].index("{word}")  # not an earlier occurrence inside the frame
    # The word is not always last: the frames place it early, in the middle and at the end.
    assert len({s.text.index(s.word) * 3 // len(s.text) for s in stimuli}) == 3


def test_frames_are_category_neutral():
    generator = _generator()
    all_words = [word for words in generator.CATEGORIES.values() for word in words]
    for frame in generator.FRAMES.values():
        assert frame.count("{word}") == 1
        for word in all_words:
            assert find_word(word, frame) is None, (word, frame)  # a frame names no category's word
        assert not re.search(r"\b(a|an)\s+\{word\}", frame, re.IGNORECASE)  # no article to leak phonology


def test_committed_file_equals_generator_output():
    generated = _generator().build()
    assert SHIPPED.read_text(encoding="utf-8") == generated.to_jsonl()
    assert load_stimuli(SHIPPED).sha256 == generated.sha256  # the file is canonical JSONL


def test_generator_runs_as_a_script_from_any_directory(tmp_path):
    output = tmp_path / "categories.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_categories.py"), str(output)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == SHIPPED.read_bytes()


# Validation


def test_every_kind_of_bad_line_is_reported_at_once_with_its_line_number(tmp_path):
    lines = [
        _record(),  # 1: good
        json.dumps({"text": "The next word is cat.", "category": "animals"}),  # 2: missing field
        "PLACEHOLDER",  # 3: invalid UTF-8, written below
        _record(text="   "),  # 4: empty text
        _record(text="The next word is dog."),  # 5: word absent
        _record(text="They concatenate strings."),  # 6: word only inside another word
        _record(),  # 7: duplicate of line 1
        '{"text": "The next word is cat.", "word": "cat"',  # 8: invalid JSON
        _record(text="A cat sat.", colour="red"),  # 9: unknown field
        _record(text="A cat ran.", frame=3),  # 10: non-string field
        "",  # 11: blank, skipped
        _record(text="The next word is Cat."),  # 12: case-sensitive, so absent
    ]
    path = _write(tmp_path, lines)
    path.write_bytes(path.read_bytes().replace(b"PLACEHOLDER", b'{"text": "caf\xff"}'))

    with pytest.raises(StimuliError) as caught:
        load_stimuli(path)
    message = str(caught.value)
    listed = message.splitlines()
    assert listed[0] == f"{path}: 10 bad lines (fix them and run again)"
    assert [int(re.match(r"  line (\d+): ", line).group(1)) for line in listed[1:]] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    by_line = {int(re.match(r"  line (\d+)", line).group(1)): line for line in listed[1:]}
    assert "missing field 'word'" in by_line[2]
    assert "not UTF-8" in by_line[3] and "0xff" in by_line[3]
    assert "empty text" in by_line[4]
    assert "target word 'cat' does not occur in the text" in by_line[5]
    assert "does not occur" in by_line[6]
    assert "duplicate of line 1" in by_line[7]
    assert "invalid JSON" in by_line[8]
    assert "unknown field 'colour'" in by_line[9]
    assert "field 'frame' must be a string" in by_line[10]
    assert "does not occur" in by_line[12]


def test_non_object_lines_and_spaced_words_are_bad(tmp_path):
    path = _write(tmp_path, ['["text", "word"]', _record(word=" cat"), _record(word="")])
    with pytest.raises(StimuliError, match="3 bad lines") as caught:
        load_stimuli(path)
    message = str(caught.value)
    assert "line 1: expected a JSON object" in message
    assert "line 2: target word ' cat' has leading or trailing spaces" in message
    assert "line 3: empty word" in message


def test_long_lists_of_bad_lines_are_capped(tmp_path):
    path = _write(tmp_path, ["not json"] * 70)
    with pytest.raises(StimuliError) as caught:
        load_stimuli(path)
    listed = str(caught.value).splitlines()
    assert listed[0].endswith("70 bad lines (fix them and run again)")
    assert len(listed) == 1 + 50 + 1 and listed[-1] == "  ... and 20 more bad lines"


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "absent.jsonl", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: _write(tmp, []), "holds no stimuli"),
    (lambda tmp: _write(tmp, ["", "   "]), "holds no stimuli"),
])
def test_unusable_files_give_a_one_line_error(tmp_path, make, expected):
    with pytest.raises(MlxscanError, match=expected) as caught:
        load_stimuli(make(tmp_path))
    assert "\n" not in str(caught.value)


def test_good_file_loads_with_defaults_spans_and_hash(tmp_path):
    lines = [_record(text="A cat and a concatenation: cat.", frame="f1"), "",
             _record(text="Seven dogs.", word="dogs", category="animals", group="dog")]
    path = _write(tmp_path, lines)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))  # BOM and CRLF are fine
    stimuli = load_stimuli(path)
    first, second = stimuli
    assert (first.word_span, first.frame, first.group, first.line) == ((2, 5), "f1", "cat", 1)
    assert (second.word_span, second.frame, second.group, second.line) == ((6, 10), None, "dog", 3)
    # The hash is of the content, not the bytes: BOM, CRLF and blank lines do not change it.
    assert stimuli.sha256 == hashlib.sha256(stimuli.to_jsonl().encode()).hexdigest()
    assert stimuli.sha256 == StimulusSet.from_records([json.loads(line) for line in lines if line]).sha256
    assert stimuli.path == path and stimuli[1] is second and len(stimuli) == 2


def test_word_matches_whole_words_only():
    assert find_word("cat", "concatenate") is None
    assert find_word("cat", "cats") is None
    assert find_word("cat", "a cat's toy") == (2, 5)
    assert find_word("ice cream", "I like ice cream.") == (7, 16)
    assert find_word("C++", "I write C++ daily") == (8, 11)


# Sets built in memory


def test_from_records_validates_like_a_file():
    records = [{"text": "The cat.", "word": "cat", "category": "animals"},
               {"text": "The dog.", "word": "cat", "category": "animals"},
               {"text": "The cat.", "word": "cat", "category": "animals"},
               {"text": "The cow.", "word": "cow", "category": "animals", "extra": "x"},
               "not a dict"]
    with pytest.raises(StimuliError) as caught:
        StimulusSet.from_records(records)
    listed = str(caught.value).splitlines()
    assert listed[0] == "records: 4 bad records (fix them and run again)"
    assert listed[1].startswith("  record 2: target word 'cat' does not occur")
    assert listed[2] == "  record 3: duplicate of record 1 (same text and word)"
    assert listed[3].startswith("  record 4: unknown field 'extra'")
    assert listed[4].startswith("  record 5: expected a JSON object")
    with pytest.raises(MlxscanError, match="no stimuli"):
        StimulusSet.from_records([])


def test_labels_groups_and_categories_on_a_planted_set(tmp_path):
    planted = [("zebra", "animals", "zebra"), ("red", "colors", "red"), ("ant", "animals", "bug"),
               ("blue", "colors", "blue"), ("bee", "animals", "bug"), ("axe", "tools", "axe")]
    stimuli = StimulusSet.from_records(
        [{"text": f"Say {word} now.", "word": word, "category": category, "group": group}
         for word, category, group in planted])
    assert stimuli.categories == ["animals", "colors", "tools"]
    assert stimuli.labels.tolist() == [0, 1, 0, 1, 0, 2]
    assert stimuli.labels.dtype == np.int64
    assert stimuli.groups.tolist() == ["zebra", "red", "bug", "blue", "bug", "axe"]
    assert stimuli.texts[0] == "Say zebra now." and stimuli.words[2] == "ant"
    assert stimuli.path is None and len(stimuli.sha256) == 64

    # Canonical JSONL round-trips: written, loaded, the same stimuli and the same hash.
    path = tmp_path / "planted.jsonl"
    path.write_text(stimuli.to_jsonl(), encoding="utf-8")
    loaded = load_stimuli(path)
    assert loaded.stimuli == stimuli.stimuli and loaded.sha256 == stimuli.sha256


def test_stimuli_module_imports_nothing_heavy():
    # Read the module's own imports: `import mlxscan` itself loads mlx, so sys.modules cannot tell.
    tree = ast.parse((ROOT / "mlxscan" / "stimuli.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] if node.level == 0 else "." + (node.module or "")
                 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "hashlib", "json", "pathlib", "re", "numpy", ".errors"}


# Text corpora


def test_texts_load_from_txt_and_jsonl_as_one_corpus(tmp_path):
    texts = ["The river runs north.", "Why do cats sleep so much?"]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "source": "x"}) for t in texts) + "\n\n")

    from_txt, from_jsonl = load_texts(tmp_path / "a.txt"), load_texts(tmp_path / "b.jsonl")

    assert from_txt.texts == from_jsonl.texts == texts
    assert from_txt.sha256 == from_jsonl.sha256 and from_txt.kind == "texts"
    assert list(from_txt.groups) == ["text 1", "text 2"]  # each text its own split group
    assert [json.loads(line) for line in from_txt.to_jsonl().splitlines()] == [{"text": t} for t in texts]
    with pytest.raises(MlxscanError, match="no categories"):
        from_txt.labels


@pytest.mark.parametrize("name, content, phrase", [
    ("blank.txt", "one\n\nthree\n", "blank.txt:2: empty text"),
    ("bad.jsonl", '{"text": "one"}\n{"words": "two"}\n', 'bad.jsonl:2: each line needs a string field "text"'),
    ("table.csv", "text\none\n", "must be a .txt file"),
    ("empty.txt", "", "holds no texts"),
])
def test_bad_text_files_are_one_clear_error(tmp_path, name, content, phrase):
    (tmp_path / name).write_text(content)
    with pytest.raises(MlxscanError) as caught:
        load_texts(tmp_path / name)
    assert phrase in str(caught.value)
