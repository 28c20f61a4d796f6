"""The `mlxscan` command: help for every command, one-line errors with exit code 2, `verify --json`.

Error behaviour is checked in real subprocesses (`python -m mlxscan`), as a user meets it: the
message, the exit status and what lands on disk all come from the real entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxscan.cli import main
from mlxscan.models import bundled_model_path

TINY_CONTEXT = 256  # model_factory's max_position_embeddings


# ----------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """A tokenizer cache for the subprocesses, so the throwaway tiny folders stay out of ~/.cache."""
    return tmp_path_factory.mktemp("cache")


def run_cli(args, *, cwd: Path, tokenizer_cache: Path, scratch: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXSCAN_CACHE": str(tokenizer_cache)}
    if scratch is not None:  # where tempfile would write, so a test can see that nothing was
        env.update(TMPDIR=str(scratch), TEMP=str(scratch), TMP=str(scratch))
    return subprocess.run([sys.executable, "-m", "mlxscan", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def copy_model(tiny_folder: Path, target: Path) -> Path:
    shutil.copytree(tiny_folder, target)
    return target


# ----------------------------------------------------------------------------------------------------
# 1. Help


HELP_ARGS = [["--help"], *([name, "--help"] for name in sorted(main.commands))]  # new commands join in


@pytest.mark.parametrize("args", HELP_ARGS, ids=" ".join)
def test_help(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")


# ----------------------------------------------------------------------------------------------------
# 2. Bad input: one line, exit 2, nothing written
#
# Each case prepares its input inside the working folder and returns (arguments, a phrase the
# message must contain).


def missing_model(work, tiny_folder):
    return ["verify", "--model", "no-such-model"], "does not exist"


def truncated_gguf(work, tiny_folder):
    with open(bundled_model_path(), "rb") as source:
        (work / "cut.gguf").write_bytes(source.read(1 << 20))  # the first 1 MB: header intact, tensors gone
    return ["verify", "--model", "cut.gguf"], "truncated or corrupt"


def corrupt_safetensors(work, tiny_folder):
    weights = copy_model(tiny_folder, work / "corrupt") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["verify", "--model", "corrupt"], "truncated or corrupt"


def unknown_model_type(work, tiny_folder):
    config_path = copy_model(tiny_folder, work / "foo") / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "foo"}))
    return ["verify", "--model", "foo"], "model_type 'foo' is not supported"


def empty_line_in_texts(work, tiny_folder):
    (work / "texts.txt").write_text("The cat sat.\n\nThe dog lay.\n")
    return ["verify", "--model", str(tiny_folder), "--texts", "texts.txt"], "texts.txt:2: empty text"


def invalid_json_line(work, tiny_folder):
    (work / "texts.jsonl").write_text('{"text": "The cat sat."}\n{"text": "The dog\n')
    return ["verify", "--model", str(tiny_folder), "--texts", "texts.jsonl"], "texts.jsonl:2: invalid JSON"


def text_longer_than_context(work, tiny_folder):
    (work / "long.txt").write_text("The cat sat.\n" + " ".join(["word"] * 400) + "\n")  # >= 400 tokens
    return ["verify", "--model", str(tiny_folder), "--texts", "long.txt"], f"longer than the model's context of {TINY_CONTEXT}"


def texts_not_utf8(work, tiny_folder):
    (work / "latin1.txt").write_bytes("Un café, s'il vous plaît.\n".encode("latin-1"))
    return ["verify", "--model", str(tiny_folder), "--texts", "latin1.txt"], "not UTF-8"


BAD_INPUTS = [missing_model, truncated_gguf, corrupt_safetensors, unknown_model_type, empty_line_in_texts,
              invalid_json_line, text_longer_than_context, texts_not_utf8]


@pytest.mark.parametrize("prepare", BAD_INPUTS, ids=lambda prepare: prepare.__name__)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_folder, tokenizer_cache, prepare):
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    args, phrase = prepare(work, tiny_folder)
    before = snapshot(work)

    result = run_cli(args, cwd=work, tokenizer_cache=tokenizer_cache, scratch=scratch)

    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), f"stderr should be one Error: line, got {lines}"
    assert phrase in lines[0], lines[0]
    assert result.returncode == 2, f"exit status {result.returncode}, not 2 (1 means verify found a mismatch)"
    assert result.stdout == ""
    assert snapshot(work) == before
    assert not any(scratch.iterdir()), list(scratch.iterdir())


# ----------------------------------------------------------------------------------------------------
# 3. verify --json on a tiny model (the bundled model's verify takes 40 s and is tested elsewhere)


def test_verify_json_on_a_tiny_model(tmp_path, tiny_folder, tokenizer_cache):
    result = run_cli(["verify", "--model", str(tiny_folder), "--json"], cwd=tmp_path, tokenizer_cache=tokenizer_cache)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert {"model", "logits_rel_err", "hidden_rel_err", "top1_agree", "ok"} <= set(report)
    assert report["model"] == str(tiny_folder)
    assert len(report["hidden_rel_err"]) == json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert report["ok"] is True
    assert report["logits_rel_err"] <= 1e-4 and max(report["hidden_rel_err"]) <= 1e-4
    assert report["top1_agree"] == 1.0
