"""Scans: batching changes no value, word pooling, the token-level store, the manifest, reuse of a
finished scan, resume after a kill, bounded memory, bad input and a full disk.

The bundled SmolLM2-135M-Instruct covers what needs a real tokenizer and real activations (batch
agreement, two-token words, resume); a tiny random Llama with 6 layers covers the rest quickly.
CLI behaviour is checked in real subprocesses (`python -m mlxscan scan`), as a user meets it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxscan import MlxscanError, open_scan  # noqa: E402
from mlxscan.capture import scan as scan_module  # noqa: E402
from mlxscan.capture.scan import ScanSettings, run_scan  # noqa: E402
from mlxscan.capture.sites import site_width  # noqa: E402
from mlxscan.stimuli import StimulusSet, load_stimuli  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "stimuli" / "categories.jsonl"
SITES = ("resid_post", "mlp_act")
TINY_LAYERS = 6  # enough for --layers 3,5
# Words of the shipped set that the bundled tokenizer splits into two tokens.
TWO_TOKEN_WORDS = ("chisel", "pliers", "plumber")


# ----------------------------------------------------------------------------------------------------
# Helpers


def shipped_records() -> list[dict]:
    return [json.loads(line) for line in SHIPPED.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def distinct_records(n: int) -> list[dict]:
    """n different stimuli of (nearly) equal token length, so the batches are alike whatever n is."""
    words = ("apple", "river", "hammer", "violin", "tiger", "cloud", "pencil", "garden", "window", "candle")
    records = []
    for i in range(n):
        word = words[i % len(words)]
        text = (f"Report {i:05d}: the {word} was seen near the old mill on day {i * 7 % 997:03d}, "
                f"and everyone in the village talked about the {word} for weeks.")
        records.append({"text": text, "word": word, "category": f"c{i % 3}"})
    return records


def max_relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: one scale-free number per comparison."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def relative_difference(a, b) -> float:
    """||a - b|| / ||b|| (float64): how far apart two activations are as a whole."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def word_token_positions(model, text: str, word: str) -> list[int]:
    """The tokens whose character spans overlap the word's first whole-word occurrence."""
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)
    _, offsets = model.tokenizer.encode_with_offsets(text)
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < match.end() and b > match.start()]


def hand_pool(tokens: np.ndarray, pool: str, word_positions: list[int], adds_bos: bool) -> np.ndarray:
    """Pool one stimulus' [layers, length, width] over its tokens as the scan documents it."""
    if pool == "last":
        return tokens[:, -1]
    if pool == "mean":  # BOS is left out of the mean when the tokenizer adds one
        first = 1 if adds_bos and tokens.shape[1] > 1 else 0
        return tokens[:, first:].mean(axis=1, dtype=np.float64)
    return tokens[:, word_positions].mean(axis=1, dtype=np.float64)


def run_cli(args, *, cwd: Path) -> subprocess.CompletedProcess:
    # The environment carries conftest's MLXSCAN_CACHE, so children reuse the tokenizers exported here.
    return subprocess.run([sys.executable, "-m", "mlxscan", "scan", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def cli_process(args, *, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlxscan", "scan", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def read_done(folder: Path) -> int | None:
    try:
        return json.loads((folder / "progress.json").read_text())["done"]
    except FileNotFoundError:
        return None


def assert_one_error_line(result: subprocess.CompletedProcess, phrase: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), f"stderr should be one Error: line, got {lines}"
    assert phrase in lines[0], lines[0]
    assert result.returncode == 2, f"exit status {result.returncode}, not 2"


# ----------------------------------------------------------------------------------------------------
# Models and shared scans


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=TINY_LAYERS)
    return mlxscan.load(folder)


@pytest.fixture(scope="module")
def bundled():
    return mlxscan.load()


@pytest.fixture(scope="module")
def bundled_stimuli() -> StimulusSet:
    """About 40 shipped stimuli of every frame (so lengths differ and batches pad), plus two-token words."""
    records = shipped_records()
    chosen = records[::31] + [r for r in records if r["word"] in TWO_TOKEN_WORDS and r["frame"] == "f02"]
    return StimulusSet.from_records(chosen)


@pytest.fixture(scope="module")
def bundled_one_by_one(bundled, bundled_stimuli) -> list[dict[str, np.ndarray]]:
    """Each stimulus run alone through `model.run`: site -> [layers, length, width]."""
    alone = []
    for stimulus in bundled_stimuli:
        recording = bundled.run(stimulus.text, sites=list(SITES))
        alone.append({site: recording[site][0] for site in SITES})
    return alone


@pytest.fixture(scope="module")
def bundled_scans(bundled, bundled_stimuli, tmp_path_factory):
    """bundled_scans(pool) -> a batch-size-7 scan of bundled_stimuli, made once per pool."""
    root, made = tmp_path_factory.mktemp("bundled-scans"), {}

    def get(pool: str):
        if pool not in made:
            made[pool] = run_scan(bundled, bundled_stimuli, root / pool, ScanSettings(sites=SITES, pool=pool, batch_size=7))
        return made[pool]

    return get


@pytest.fixture(scope="module")
def tiny_stimuli_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("tiny-stimuli") / "stimuli.jsonl", shipped_records()[::40])


@pytest.fixture(scope="module")
def tiny_scan(tiny, tiny_stimuli_file, tmp_path_factory):
    """(stimuli, settings, scan): a pooled scan of every layer on the tiny model."""
    stimuli = load_stimuli(tiny_stimuli_file)
    settings = ScanSettings(sites=SITES, pool="last", batch_size=7)
    return stimuli, settings, run_scan(tiny, stimuli, tmp_path_factory.mktemp("tiny-scan") / "scan", settings)


# ----------------------------------------------------------------------------------------------------
# 1. Batching changes no value


@pytest.mark.parametrize("pool", ["last", "mean", "word"])
def test_batched_scan_equals_one_by_one_runs(bundled, bundled_stimuli, bundled_one_by_one, bundled_scans, pool):
    lengths = {len(bundled.tokenize(text)) for text in bundled_stimuli.texts}
    assert len(lengths) > 1, "all stimuli have one length: batches would not pad"
    scan = bundled_scans(pool)
    adds_bos = bundled.tokenizer.adds_bos
    for site in SITES:
        expected = np.stack([
            hand_pool(alone[site], pool, word_token_positions(bundled, s.text, s.word), adds_bos)
            for s, alone in zip(bundled_stimuli, bundled_one_by_one)
        ])
        assert scan[site].shape == expected.shape, site
        error = max_relative_error(scan[site], expected)
        assert error <= 1e-5, f"{site}, pool {pool}: batch of 7 differs from one-by-one runs by {error:.2e}"


# ----------------------------------------------------------------------------------------------------
# 2. Word pooling covers exactly the word's tokens


def test_word_pool_is_the_mean_over_exactly_the_words_two_tokens(bundled, bundled_stimuli, bundled_one_by_one,
                                                                  bundled_scans):
    scan = bundled_scans("word")
    planted = [n for n, s in enumerate(bundled_stimuli) if s.word in TWO_TOKEN_WORDS]
    assert len(planted) == len(TWO_TOKEN_WORDS)
    for n in planted:
        stimulus = bundled_stimuli[n]
        positions = word_token_positions(bundled, stimulus.text, stimulus.word)
        ids = bundled.tokenize(stimulus.text)
        assert len(positions) == 2, f"{stimulus.word!r} is tokens {positions}, not two tokens"
        assert bundled.tokenizer.decode([ids[p] for p in positions]).strip() == stimulus.word
        assert positions[-1] < len(ids) - 1, "the word should not end the text, or word and last would coincide"
        for site in SITES:
            tokens, stored = bundled_one_by_one[n][site], scan[site][n]
            error = max_relative_error(stored, tokens[:, positions].mean(axis=1, dtype=np.float64))
            assert error <= 1e-5, f"{stimulus.word!r} {site}: word pool is not the mean of its two tokens ({error:.2e})"
            assert relative_difference(stored, tokens[:, -1]) > 0.05, f"{site}: word pool equals the last token"
            for position in positions:  # both tokens count, not just one of them
                assert relative_difference(stored, tokens[:, position]) > 0.05, f"{site}: word pool is token {position} alone"


# ----------------------------------------------------------------------------------------------------
# 3. Token-level scans (pool "all")


def test_token_level_scan_keeps_every_token_of_every_stimulus(tiny, tmp_path):
    stimuli = StimulusSet.from_records(shipped_records()[::97])
    scan = run_scan(tiny, stimuli, tmp_path / "all", ScanSettings(sites=SITES, pool="all", batch_size=5))
    token_lists = [tiny.tokenize(text) for text in stimuli.texts]
    n_tokens = sum(map(len, token_lists))

    assert len({len(tokens) for tokens in token_lists}) > 1, "all stimuli have one length: batches would not pad"
    assert scan.offsets.tolist() == np.concatenate([[0], np.cumsum([len(t) for t in token_lists])]).tolist()
    assert np.load(tmp_path / "all" / "token_ids.npy").tolist() == [t for tokens in token_lists for t in tokens]
    for site in SITES:
        assert scan[site].shape == (n_tokens, tiny.n_layers, site_width(tiny, site)), site
        for item, stimulus in enumerate(stimuli):
            alone = tiny.run(stimulus.text, sites=[site])
            expected = alone.unpadded(site, 0).swapaxes(0, 1)  # [layers, length, width] -> the store's [length, layers, width]
            error = max_relative_error(scan.tokens_of(site, item), expected)
            assert error <= 1e-5, f"{site}, stimulus {item}: {error:.2e}"


def test_a_text_corpus_scans_token_by_token_and_reopens_as_texts(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river runs north.\nShe paid for two coffees and a muffin.\nWhy do cats sleep?\n")
    result = run_cli(["--model", tiny.path, "--texts", corpus, "--sites", "mlp_act", "--pool", "all",
                      "--out", tmp_path / "corpus"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    scan = open_scan(tmp_path / "corpus")
    assert scan.manifest["stimuli"]["kind"] == "texts" and scan.manifest["stimuli"]["categories"] is None
    assert scan.stimuli.texts == corpus.read_text().splitlines() and scan.stimuli.kind == "texts"
    alone = tiny.run("Why do cats sleep?", sites=["mlp_act"]).unpadded("mlp_act", 0).swapaxes(0, 1)
    assert max_relative_error(scan.tokens_of("mlp_act", 2), alone) <= 1e-5
    with pytest.raises(MlxscanError, match="no categories"):
        scan.labels


def test_a_text_corpus_cannot_be_pooled_over_a_target_word(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river runs north.\n")

    result = run_cli(["--model", tiny.path, "--texts", corpus, "--pool", "word", "--out", tmp_path / "out"], cwd=tmp_path)

    assert_one_error_line(result, "no target word")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# 4. The store and its manifest


def test_store_has_one_read_only_memmap_per_site_and_a_full_manifest(tiny, tiny_scan):
    stimuli, settings, scan = tiny_scan
    folder = scan.folder

    assert {path.name for path in folder.iterdir()} == {"manifest.json", "progress.json", "stimuli.jsonl",
                                                        *(f"{site}.npy" for site in SITES)}
    for site in SITES:
        assert np.load(folder / f"{site}.npy").shape == (len(stimuli), tiny.n_layers, site_width(tiny, site))
        array = scan[site]
        assert isinstance(array, np.memmap) and array.dtype == np.float32, site
        assert not array.flags.writeable, site
        with pytest.raises(ValueError):
            array[0, 0, 0] = 1.0

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["ref"] == str(tiny.path)
    assert manifest["model"]["sha256"] == tiny.weights_sha256() and re.fullmatch(r"[0-9a-f]{64}", manifest["model"]["sha256"])
    assert manifest["stimuli"]["sha256"] == stimuli.sha256 and manifest["stimuli"]["n"] == len(stimuli)
    assert (manifest["sites"], manifest["layers"], manifest["pool"], manifest["store_dtype"]) == \
        (list(SITES), list(range(tiny.n_layers)), "last", "float32")
    assert manifest["tokenizer"]["adds_bos"] == tiny.tokenizer.adds_bos
    assert manifest["tokenizer"]["vocab_size"] == tiny.tokenizer.vocab_size
    assert manifest["versions"] == {name: metadata.version(name) for name in ("mlx", "mlx-lm", "mlxscan")}
    started, finished = (datetime.fromisoformat(manifest[key]) for key in ("started", "finished"))
    assert started <= finished

    assert load_stimuli(folder / "stimuli.jsonl").to_jsonl() == stimuli.to_jsonl()
    assert scan.stimuli.texts == stimuli.texts and scan.labels.tolist() == stimuli.labels.tolist()
    assert (scan.sites, scan.layers, scan.pool, len(scan)) == (list(SITES), list(range(tiny.n_layers)), "last", len(stimuli))


def test_cli_stores_only_the_chosen_layers_in_float16(tiny, tiny_scan, tiny_stimuli_file, tmp_path):
    _, _, full = tiny_scan
    result = run_cli(["--model", tiny.path, "--stimuli", tiny_stimuli_file, "--sites", ",".join(SITES),
                      "--layers", "3,5", "--dtype", "float16", "--json", "--out", tmp_path / "subset"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["layers"], printed["store_dtype"], printed["status"]) == ([3, 5], "float16", "complete")
    scan = open_scan(tmp_path / "subset")
    for site in SITES:
        assert scan[site].dtype == np.float16 and scan[site].shape == (len(scan), 2, site_width(tiny, site))
        for index, layer in enumerate((3, 5)):  # the same values as the float32 scan of every layer, rounded
            error = max_relative_error(scan[site][:, index], full.layer(site, layer))
            assert error <= 1e-3, f"{site} layer {layer}: {error:.2e}"
    with pytest.raises(MlxscanError, match="not recorded"):
        scan.layer("resid_post", 4)


# ----------------------------------------------------------------------------------------------------
# 5. A finished scan is reused, never recomputed


def test_finished_scan_is_returned_without_running_the_model(tiny, tiny_scan, monkeypatch):
    stimuli, settings, scan = tiny_scan
    before = snapshot(scan.folder)

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a finished scan ran the model again")

    monkeypatch.setattr(scan_module, "run_tokens", no_forward_pass)
    again = run_scan(tiny, stimuli, scan.folder, settings)

    assert snapshot(scan.folder) == before  # not a byte rewritten, not an mtime touched
    assert np.array_equal(again["resid_post"], scan["resid_post"])


# ----------------------------------------------------------------------------------------------------
# 6. Resume after a kill


def test_scan_killed_mid_run_resumes_without_redoing_finished_batches(bundled, tmp_path):
    stimuli_file = write_jsonl(tmp_path / "stimuli.jsonl", shipped_records()[::12])  # 100 stimuli, 25 batches
    stimuli = load_stimuli(stimuli_file)
    out = tmp_path / "scan"
    args = ["--stimuli", stimuli_file, "--out", out, "--batch-size", 4, "--sites", "resid_post"]

    process = cli_process(args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while (read_done(out) or 0) < 8:
        assert process.poll() is None, f"the scan ended before it could be killed: {process.communicate()}"
        assert time.monotonic() < deadline, "the scan made no progress in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()

    done = read_done(out)
    assert 8 <= done < len(stimuli), done
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(MlxscanError, match=r"incomplete.*resume"):
        open_scan(out)

    # Mark what the killed run finished: a rerun that recomputed it would overwrite the marks.
    # Batches are formed by prefix_batches, the same way every run (see mlxscan/capture/scan.py).
    batches = scan_module.prefix_batches([bundled.tokenize(s.text) for s in stimuli], 4)
    order = [i for batch in batches for i in batch]
    finished = order[:done]
    stored = np.load(out / "resid_post.npy", mmap_mode="r+")
    saved = np.array(stored[finished])
    stored[finished] = -12345.0
    stored.flush()
    del stored

    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = np.array(open_scan(out)["resid_post"])
    assert read_done(out) == len(stimuli)
    assert np.all(resumed[finished] == -12345.0), \
        "rows the killed run had finished were rewritten (recomputed, or overwritten by writes to other rows)"

    uninterrupted = run_scan(bundled, stimuli, tmp_path / "uninterrupted", ScanSettings(sites=("resid_post",), batch_size=4))
    resumed[finished] = saved
    error = max_relative_error(resumed, uninterrupted["resid_post"])
    assert error <= 1e-6, f"killed and resumed scan differs from an uninterrupted one by {error:.2e}"


# ----------------------------------------------------------------------------------------------------
# 7. Memory follows the batch, not the size of the scan

PEAK_MEMORY_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    import mlxscan
    from mlxscan.capture.scan import ScanSettings, run_scan
    from mlxscan.stimuli import load_stimuli

    model = mlxscan.load(sys.argv[1])
    settings = ScanSettings(sites=tuple(mlxscan.LAYER_SITES), pool="all", batch_size=8)
    run_scan(model, load_stimuli(sys.argv[2]), Path(sys.argv[3]), settings)
    status = Path("/proc/self/status").read_text()
    print(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])  # peak RSS, kB
""")


def test_peak_memory_does_not_grow_with_the_number_of_stimuli(tiny, tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    peaks_kb, store_bytes = {}, {}
    # N = 40 is five batches of 8, so the allocator has settled before the peak is compared.
    for n in (40, 400):
        stimuli_file = write_jsonl(tmp_path / f"stimuli-{n}.jsonl", distinct_records(n))
        out = tmp_path / f"scan-{n}"
        result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHILD, str(tiny.path), str(stimuli_file), str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks_kb[n] = int(result.stdout.split()[-1])
        store_bytes[n] = sum(path.stat().st_size for path in out.glob("*.npy"))

    summary = f"peak RSS {peaks_kb} kB, stores {({n: f'{b / 1e6:.0f} MB' for n, b in store_bytes.items()})}"
    print(summary)
    assert store_bytes[400] >= 200e6, f"the large store is too small to show a leak: {summary}"
    assert peaks_kb[400] <= 1.2 * peaks_kb[40], f"peak memory grows with the scan: {summary}"


# ----------------------------------------------------------------------------------------------------
# 8. Bad input: exit 2, one message, nothing written
#
# Each case prepares its input inside the working folder and returns (arguments, a phrase the
# message must contain); every case writes its scan to work/out.

GOOD_RECORDS = [
    {"text": "The cat sat on the mat.", "word": "cat", "category": "animals"},
    {"text": "A red apple fell.", "word": "apple", "category": "foods"},
    {"text": "He held the hammer tightly.", "word": "hammer", "category": "tools"},
]


def make_scan(tiny, work: Path, stimuli_file="good.jsonl", sites=("resid_post",)) -> None:
    """A finished scan in work/out, of a file there (a file's identity is its bytes, so load it as the CLI does)."""
    run_scan(tiny, load_stimuli(work / stimuli_file), work / "out", ScanSettings(sites=sites))


def out_holds_other_sites(work, tiny):
    make_scan(tiny, work, sites=("resid_post",))
    return ["--sites", "mlp_act"], "choose another --out or pass --overwrite"


def out_holds_other_stimuli(work, tiny):
    write_jsonl(work / "fewer.jsonl", GOOD_RECORDS[:2])
    make_scan(tiny, work, "fewer.jsonl")
    return [], "choose another --out or pass --overwrite"


def out_holds_no_scan(work, tiny):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("not a scan")
    return [], "holds no scan"


def unknown_site(work, tiny):
    return ["--sites", "resid_post,banana"], "banana"


def model_level_site(work, tiny):
    return ["--sites", "logits"], "per-layer sites"


def layer_out_of_range(work, tiny):
    return ["--layers", f"0,{TINY_LAYERS}"], "no such layers"


def layers_not_numbers(work, tiny):
    return ["--layers", "abc"], "--layers"


def negative_layer(work, tiny):
    return ["--layers=-1"], "--layers"


def batch_size_zero(work, tiny):
    return ["--batch-size", "0"], "--batch-size must be at least 1"


BAD_INPUTS = [out_holds_other_sites, out_holds_other_stimuli, out_holds_no_scan, unknown_site, model_level_site,
              layer_out_of_range, layers_not_numbers, negative_layer, batch_size_zero]


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    write_jsonl(folder / "good.jsonl", GOOD_RECORDS)
    return folder


@pytest.mark.parametrize("prepare", BAD_INPUTS, ids=lambda prepare: prepare.__name__)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(tiny, work, prepare):
    args, phrase = prepare(work, tiny)
    before = snapshot(work)

    result = run_cli(["--model", tiny.path, "--stimuli", "good.jsonl", "--out", "out", *args], cwd=work)

    assert_one_error_line(result, phrase)
    assert result.stdout == ""
    assert snapshot(work) == before  # --out neither created nor touched


def test_bad_stimulus_lines_are_all_reported_and_no_out_is_created(tiny, work):
    lines = [
        json.dumps(GOOD_RECORDS[0]),
        '{"text": "The dog ran.", "word": "dog"',  # 2: invalid JSON
        json.dumps({"text": "The dog ran.", "category": "animals"}),  # 3: no word
        json.dumps(GOOD_RECORDS[1]),
        json.dumps({"text": "The dog ran.", "word": "cat", "category": "animals"}),  # 5: word not in text
        json.dumps(GOOD_RECORDS[0]),  # 6: duplicate of line 1
    ]
    (work / "bad.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(work)

    result = run_cli(["--model", tiny.path, "--stimuli", "bad.jsonl", "--out", "out"], cwd=work)

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    reported = result.stderr.splitlines()
    assert reported[0].startswith("Error:") and "4 bad lines" in reported[0], reported
    assert sum(line.startswith("Error:") for line in reported) == 1, reported
    for number in (2, 3, 5, 6):
        assert any(f"line {number}:" in line for line in reported[1:]), f"line {number} not reported: {reported}"
    assert len(reported) == 1 + 4, reported
    assert not (work / "out").exists()
    assert snapshot(work) == before


def test_overwrite_replaces_a_different_scan(tiny, work):
    make_scan(tiny, work, sites=("resid_post",))

    result = run_cli(["--model", tiny.path, "--stimuli", "good.jsonl", "--sites", "mlp_act", "--overwrite",
                      "--out", "out"], cwd=work)

    assert result.returncode == 0, result.stderr
    scan = open_scan(work / "out")
    assert scan.sites == ["mlp_act"] and len(scan) == len(GOOD_RECORDS)
    assert not (work / "out" / "resid_post.npy").exists(), "the replaced scan's array was left behind"


# ----------------------------------------------------------------------------------------------------
# 9. A full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_a_clear_error_and_leaves_no_complete_looking_store(tiny, tmp_path, monkeypatch):
    out = tmp_path / "scan"
    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)

    with pytest.raises(MlxscanError, match="disk space"):
        run_scan(tiny, StimulusSet.from_records(GOOD_RECORDS), out, ScanSettings(sites=SITES))

    manifest = out / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"
    with pytest.raises(MlxscanError):
        open_scan(out)


def test_after_a_full_disk_the_same_scan_runs_once_there_is_space(tiny, tmp_path, monkeypatch):
    out, stimuli, settings = tmp_path / "scan", StimulusSet.from_records(GOOD_RECORDS), ScanSettings(sites=SITES)
    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fallocate", no_space, raising=False)
        with pytest.raises(MlxscanError, match="disk space"):
            run_scan(tiny, stimuli, out, settings)

    # The user frees space and runs the same command again: mlxscan's own leftovers must not block it.
    scan = run_scan(tiny, stimuli, out, settings)
    assert scan.manifest["status"] == "complete" and len(scan) == len(GOOD_RECORDS)


# ----------------------------------------------------------------------------------------------------
# Batches that share a prefix


def test_prefix_batches_cover_every_stimulus_once_and_group_frames(bundled):
    token_ids = [bundled.tokenize(record["text"]) for record in shipped_records()]
    batches = scan_module.prefix_batches(token_ids, 32)
    assert sorted(i for batch in batches for i in batch) == list(range(len(token_ids)))
    assert max(map(len, batches)) <= 32
    assert scan_module.prefix_batches(token_ids, 32) == batches  # the same every run: resumable
    from mlxscan.capture.forward import shared_prefix_length

    computed = sum(shared_prefix_length([token_ids[i] for i in batch]) * (1 - len(batch))
                   + len(batch) * max(len(token_ids[i]) for i in batch) for batch in batches)
    # Each frame's opening words run once per batch: measured 6,344 positions for 9,990 tokens.
    assert computed < 0.7 * sum(map(len, token_ids))


def test_a_scan_started_under_another_batching_starts_over(bundled, tmp_path):
    stimuli = load_stimuli(write_jsonl(tmp_path / "stimuli.jsonl", shipped_records()[::60]))  # 20 stimuli
    settings = ScanSettings(sites=("resid_post",), batch_size=4)
    out = tmp_path / "scan"
    reference = np.array(run_scan(bundled, stimuli, out, settings)["resid_post"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="running", batching="by-length/0")  # as an older version would have left it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "progress.json").write_text(json.dumps({"done": 8}))
    stored = np.load(out / "resid_post.npy", mmap_mode="r+")
    stored[:] = -1.0  # rows of the old order must not survive
    stored.flush()
    del stored
    resumed = run_scan(bundled, stimuli, out, settings)
    assert json.loads((out / "manifest.json").read_text())["batching"] == scan_module.BATCHING
    assert np.allclose(np.array(resumed["resid_post"]), reference, rtol=0, atol=1e-4)
