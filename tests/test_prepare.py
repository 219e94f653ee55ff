"""prepare with worker processes and every input format: the same bytes for any number of workers, each
format's documents back exactly, errors that name the file and the line or row, bounded memory."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO, launch_env
from test_errors import cli, error_line

import sparsemixer_ds.data.corpus as corpus
from sparsemixer_ds.data.corpus import default_corpus, iter_documents
from sparsemixer_ds.data.prepare import _ordered, _pool, prepare
from sparsemixer_ds.data.prepared import load_tokenizer

OUTPUTS = ("train.bin", "val.bin", "meta.json", "tokenizer.json")


def texts(n: int, seed: int = 0) -> list:
    """``n`` distinct documents with non-ASCII text, newlines and an empty one in the middle."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "ünï", "中文", "😀", "tab\tbed", "line\nbreak", '"quoted"', "x" * 40]
    docs = [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for i in range(n)]
    docs[n // 2] = ""
    return docs


def jsonl_bytes(docs: list) -> bytes:
    return "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(docs)).encode()


def write_formats(root: Path, n: int = 400) -> dict:
    """One corpus per format: name -> (input paths, the documents they hold)."""
    root.mkdir()
    text_dir = root / "texts"
    text_dir.mkdir()
    small = texts(30, seed=1)
    for i, text in enumerate(small):
        (text_dir / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    (text_dir / "zz.md.gz").write_bytes(gzip.compress("compressed text ✓\n".encode()))
    docs = texts(n)
    (root / "big.jsonl").write_bytes(jsonl_bytes(docs))
    (root / "big.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs)))
    (root / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(jsonl_bytes(docs)))  # C4 names JSONL so
    frames = zstandard.ZstdCompressor()  # two frames, one after the other, as concatenated shards are
    half = len(docs) // 2
    (root / "big.zst").write_bytes(frames.compress(jsonl_bytes(docs[:half])) + frames.compress(jsonl_bytes(docs[half:])))
    pq.write_table(pa.table({"id": list(range(n)), "text": docs}), root / "big.parquet", row_group_size=64)
    keep = [d for d in docs if d]
    return {"text": ([text_dir], [d for d in small if d] + ["compressed text ✓\n"]),
            "jsonl": ([root / "big.jsonl"], keep), "gzip": ([root / "big.jsonl.gz"], keep),
            "json.gz": ([root / "c4-train.00000-of-01024.json.gz"], keep),
            "zstd": ([root / "big.zst"], keep), "parquet": ([root / "big.parquet"], keep)}


@pytest.fixture
def small_units(monkeypatch):
    """Units of 2 kB, so a test corpus makes many of them (a JSONL of a few hundred lines, ~20 ranges)."""
    monkeypatch.setattr(corpus, "UNIT_BYTES", 2048)


def documents(out: Path) -> list:
    """Every document of both splits, decoded: the token streams cut at eos."""
    meta = json.loads((out / "meta.json").read_text())
    tok, docs = load_tokenizer(out), []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
        ends = np.flatnonzero(ids == tok.eos_id)
        assert len(ends) == meta["documents"][split] and (not len(ids) or ends[-1] == len(ids) - 1)
        docs += [tok.decode(part.tolist()) for part in np.split(ids, ends + 1)[:-1]]
    return docs


def outputs(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in OUTPUTS if (out / name).exists()}


@pytest.mark.parametrize("fmt", ["text", "jsonl", "gzip", "json.gz", "zstd", "parquet"])
def test_each_format_same_bytes_for_any_workers_and_its_documents_back(tmp_path, small_units, fmt):
    paths, expected = write_formats(tmp_path / "in")[fmt]
    results = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"out{workers}"
        meta = prepare([str(p) for p in paths], out, val_fraction=0.2, progress=False, workers=workers)
        results[workers] = outputs(out)
    assert results[1] == results[2] == results[3]
    assert sorted(documents(tmp_path / "out1")) == sorted(expected)
    assert meta["documents"]["val"] > 0 and meta["malformed_records"] == 0


def test_bpe_same_bytes_for_any_workers_trained_and_given(tmp_path, small_units):
    formats = write_formats(tmp_path / "in", n=200)
    inputs = [str(p) for paths, _ in formats.values() for p in paths]
    expected = [d for _, docs in formats.values() for d in docs]
    for workers in (1, 2):
        prepare(inputs, tmp_path / f"bpe{workers}", tokenizer="bpe", vocab_size=400, val_fraction=0.1,
                progress=False, workers=workers)
    assert outputs(tmp_path / "bpe1") == outputs(tmp_path / "bpe2")
    assert sorted(documents(tmp_path / "bpe1")) == sorted(expected)
    given = str(tmp_path / "bpe1" / "tokenizer.json")
    for workers in (1, 3):
        prepare(inputs, tmp_path / f"given{workers}", tokenizer=given, val_fraction=0.1, progress=False,
                workers=workers)
    assert outputs(tmp_path / "given1") == outputs(tmp_path / "given3") == outputs(tmp_path / "bpe1")


def test_jsonl_ranges_keep_the_global_line_numbers(tmp_path, small_units):
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl_bytes(texts(300)))
    units = list(corpus.plan_units([path], corpus.Reading(), corpus.Tally()))
    assert len(units) > 10 and units[0].start == 0 and units[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(units, units[1:]))
    keys = [key for key, _ in iter_documents([path])]
    assert keys == [f"{path}:{i}" for i in range(1, 301) if i != 151]  # line 151 holds the empty text


def bad_line_corpus(tmp_path: Path, kind: str, bad: int = 250, n: int = 300) -> Path:
    """A corpus of ``n`` records whose record ``bad`` (1-based) is malformed."""
    docs = texts(n)
    if kind == "parquet":
        values = [None if i == bad - 1 else d for i, d in enumerate(docs)]
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.table({"text": pa.array(values, pa.string())}), path, row_group_size=32)
        return path
    lines = jsonl_bytes(docs).splitlines(keepends=True)
    lines[bad - 1] = b"{not json\n"
    data = b"".join(lines)
    path = tmp_path / {"jsonl": "bad.jsonl", "gzip": "bad.jsonl.gz", "zstd": "bad.jsonl.zst"}[kind]
    path.write_bytes({"jsonl": data, "gzip": gzip.compress(data),
                      "zstd": zstandard.ZstdCompressor().compress(data)}[kind])
    return path


@pytest.mark.parametrize("kind", ["jsonl", "gzip", "zstd", "parquet"])
def test_a_malformed_record_deep_in_a_file_is_named_or_skipped_and_counted(tmp_path, small_units, kind):
    path = bad_line_corpus(tmp_path, kind)
    problem = "has a null 'text'" if kind == "parquet" else "not valid JSON"
    with pytest.raises(ValueError, match=rf"^{path}:250: (row 250 )?{problem}.*--skip-malformed"):
        prepare([str(path)], tmp_path / "out", progress=False, workers=2)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    meta = prepare([str(path)], tmp_path / "skip", progress=False, workers=2, skip_malformed=True)
    assert meta["malformed_records"] == 1
    expected = [d for i, d in enumerate(texts(300)) if d and i != 249]
    assert sorted(documents(tmp_path / "skip")) == sorted(expected)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_truncated_stream_is_named_or_its_whole_lines_kept(tmp_path, small_units, kind):
    data = jsonl_bytes(texts(3000))  # ~300 kB: zstd blocks hold up to 128 kB, cut it after the first ones
    packed = gzip.compress(data) if kind == "gzip" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / ("cut.jsonl.gz" if kind == "gzip" else "cut.zst")
    path.write_bytes(packed[:len(packed) * 2 // 3])
    with pytest.raises(ValueError, match=rf"^{path}: a corrupt or truncated {kind} stream at line \d+"):
        prepare([str(path)], tmp_path / "out", progress=False, workers=2)
    meta = prepare([str(path)], tmp_path / "skip", progress=False, workers=2, skip_malformed=True)
    kept = documents(tmp_path / "skip")
    assert meta["malformed_records"] == 1 and 500 < len(kept) < 3000
    assert set(kept) <= set(texts(3000)), "only whole records are kept"


def test_the_checks_before_work_through_the_command(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "id": 1}) + "\n")
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), tmp_path / "a.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet\n")
    cases = [(["empty.txt"], ["holds no non-empty documents", "1 of them empty (empty.txt)"]),
             (["a.jsonl", "--text-field", "body"], ["a.jsonl:1: no string field 'body' (got ['id', 'text'])",
                                                    "--text-field"]),
             (["a.jsonl", "--text-field", "body", "--skip-malformed"],
              ["no record of the corpus has a string field 'body' (the records have: id, text)"]),
             (["a.parquet"], ["a.parquet has no column 'text' (its columns: content, id)", "--text-field"]),
             (["fake.parquet"], ["fake.parquet: not a Parquet file", "--skip-malformed"])]
    for args, needles in cases:
        error_line(cli("prepare", *args, "--out", "out", "--quiet", "--workers", "2", cwd=tmp_path), "prepare",
                   *needles)
        assert not (tmp_path / "out").exists()
    error_line(cli("prepare", "a.jsonl", "--out", "out", "--workers", "0", cwd=tmp_path), "prepare",
               "--workers must be >= 1")


def test_the_command_counts_skipped_records_and_shows_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "kept"}\n[1]\n{"text": "also kept"}\n')
    proc = cli("prepare", "a.jsonl", "--out", "out", "--skip-malformed", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "; 1 malformed record(s) skipped (--skip-malformed)" in proc.stdout
    assert "tokenize" in proc.stderr and "B/s" in proc.stderr and "Warning" not in proc.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["malformed_records"] == 1


def test_the_window_of_units_in_flight_is_bounded():
    taken, submitted = [], []

    def units():
        for i in range(40):
            submitted.append(i)
            yield corpus.TextFiles((), i)

    with _pool(2) as pool:
        for unit, result in _ordered(pool, _size, units(), window=4):
            taken.append(unit.in_bytes)
            assert result == unit.in_bytes and len(submitted) - len(taken) <= 3
    assert taken == list(range(40))


def _size(unit) -> int:
    return unit.in_bytes


MEMORY_SCRIPT = """
import resource, sys
import sparsemixer_ds.data.corpus as corpus
from sparsemixer_ds.data.prepare import prepare
corpus.UNIT_BYTES = 1 << 20
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare([sys.argv[1]], sys.argv[2], progress=False, workers=2)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "memory " * 140}).encode() + b"\n"  # ~1 kB
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(line * 1024)  # 64 MB in all
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(tmp_path / "out")], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    base, main_peak, worker_peak = (int(x) * 1024 for x in proc.stdout.split())
    size = path.stat().st_size
    # Workers are forked from the main process, so both start from its size; a window of 4 units of 1 MB
    # (and their tokens, 2 bytes each) may add a few tens of MB, never the corpus.
    assert main_peak - base < size / 3 and worker_peak - base < size / 3, (base, main_peak, worker_peak, size)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_tokens"] > size / 2


def test_default_corpus_same_bytes_for_one_and_two_workers(tmp_path):
    for workers in (1, 2):
        meta = prepare(None, tmp_path / f"w{workers}", progress=False, workers=workers)
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2")
    texts_ = [p.read_bytes().decode("utf-8", errors="replace") for p in default_corpus()]
    texts_ = [t for t in texts_ if t]
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(texts_)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(t.encode("utf-8", "replace")) + 1 for t in texts_)
    assert meta["sources"] == len(default_corpus()) and meta["malformed_records"] == 0
