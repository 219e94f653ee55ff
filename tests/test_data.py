"""Corpus preparation and the loaders, checked against expectations computed here, not read from the code."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemixer_ds.data.corpus import default_corpus, iter_documents, resolve_inputs
from sparsemixer_ds.data.loader import Mixture, eval_batches
from sparsemixer_ds.data.prepare import prepare
from sparsemixer_ds.data.prepared import TokenFile, load_tokenizer, open_split
from sparsemixer_ds.data.tokenizer import BpeTokenizer, ByteTokenizer

DOCS = {
    "a.txt": "hello world\n",
    "b.md": "# Title\r\n\r\nünïcödé text with emoji 😀 and tabs\t\there\n",
    "c.py": "def f(x):\n    return x * 2  # <|endoftext|> is just text here\n",
    "d.txt": "  leading spaces and control bytes \x01\x1b\x7f\n",  # a NUL byte would make it binary
    "e.rst": "Σ λ 中文 ✓\n" * 3,
    "f.txt": "",  # empty: skipped
    "g.txt": "short",
    "h.txt": "the quick brown fox jumps over the lazy dog\n" * 5,
}


def write_corpus(root: Path, docs=DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_bytes(text.encode("utf-8"))
    return root


def split_docs(data_dir: Path, split: str) -> list:
    """The documents of one split, decoded independently: the token stream cut at every eos."""
    meta = json.loads((data_dir / "meta.json").read_text())
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tolist()
    tok = load_tokenizer(data_dir)
    docs, current = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert current == [], "every document must end with eos"
    return docs


def assert_round_trip(data_dir: Path, expected: list) -> None:
    train, val = split_docs(data_dir, "train"), split_docs(data_dir, "val")
    assert train and val, "both splits must be non-empty"
    # Equal as multisets: every document comes back exactly once, in one split or the other
    # (the stdlib holds byte-identical files, so sets would not do).
    assert sorted(train + val) == sorted(expected)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "plain ASCII, ünïcödé, 中文, 😀\r\n\x00"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.kind) == (257, 256, "bytes")
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_prepare_bytes_round_trip(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    meta = prepare([str(corpus)], tmp_path / "out", val_fraction=0.3, progress=False)
    expected = [t for t in DOCS.values() if t]
    assert_round_trip(tmp_path / "out", expected)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257
    assert meta["sources"] == len(DOCS)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(expected)
    total = sum(len(t.encode("utf-8")) + 1 for t in expected)
    assert meta["train_tokens"] + meta["val_tokens"] == total
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name not in ("train.bin", "val.bin", "meta.json")]
    assert leftovers == []


def test_prepare_bpe_round_trip_and_reuse(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    meta = prepare([str(corpus)], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, val_fraction=0.3,
                   progress=False)
    expected = [t for t in DOCS.values() if t]
    assert_round_trip(tmp_path / "bpe", expected)
    assert meta["tokenizer"] == "bpe" and 257 <= meta["vocab_size"] <= 300

    tok = load_tokenizer(tmp_path / "bpe")
    reloaded = BpeTokenizer.from_file(tmp_path / "bpe" / "tokenizer.json")
    text = DOCS["b.md"] + DOCS["h.txt"]
    assert tok.encode(text) == reloaded.encode(text)
    from_text = BpeTokenizer.from_json((tmp_path / "bpe" / "tokenizer.json").read_text())
    assert from_text.encode(text) == tok.encode(text) and from_text.eos_id == tok.eos_id
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="broken.json"):
        BpeTokenizer.from_file(tmp_path / "broken.json")
    assert reloaded.decode(reloaded.encode(text)) == text
    # Every merge is learned from a pair seen in the training documents, so they must encode shorter than bytes.
    # (Which documents train depends on the corpus path, i.e. on tmp_path: test the ones that did.)
    trained_on = "".join(split_docs(tmp_path / "bpe", "train"))
    assert trained_on and len(tok.encode(trained_on)) < len(trained_on.encode("utf-8")), "BPE learned no merge"
    # The literal separator text inside a document stays text.
    assert tok.eos_id not in tok.encode(DOCS["c.py"])

    reused = prepare([str(corpus)], tmp_path / "reuse", tokenizer=str(tmp_path / "bpe" / "tokenizer.json"),
                     val_fraction=0.3, progress=False)
    assert reused["tokenizer"] == "bpe" and reused["vocab_size"] == meta["vocab_size"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "bpe" / name).read_bytes() == (tmp_path / "reuse" / name).read_bytes()


def test_bpe_file_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["abc abc abd"] * 10, trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    assert raw.token_to_id("<|endoftext|>") is None
    tok = BpeTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.eos_id == raw.get_vocab_size() and tok.vocab_size == tok.eos_id + 1
    assert tok.decode(tok.encode("abc ü") + [tok.eos_id]) == "abc ü"


def test_jsonl_documents_and_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second ü", "x": 1}) + "\n"
                    + json.dumps({"body": ""}) + "\n", encoding="utf-8")
    assert list(iter_documents([good], text_field="body")) == [(f"{good}:1", "first"), (f"{good}:3", "second ü")]
    with pytest.raises(ValueError, match=r"good\.jsonl:1.*'text'"):
        list(iter_documents([good]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*not valid JSON"):
        prepare([str(bad)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()

    meta = prepare([str(good)], tmp_path / "ok", text_field="body", val_fraction=0.5, progress=False)
    assert meta["text_field"] == "body"
    assert sorted(split_docs(tmp_path / "ok", "train") + split_docs(tmp_path / "ok", "val")) == ["first", "second ü"]


def test_split_deterministic_and_seeded(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, {f"doc{i:02d}.txt": f"document number {i}\n" for i in range(40)})
    run = lambda name, seed: prepare([str(corpus)], tmp_path / name, val_fraction=0.25, seed=seed, progress=False)
    run("a", 0), run("b", 0), run("c", 1)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert set(split_docs(tmp_path / "a", "val")) != set(split_docs(tmp_path / "c", "val"))
    for name in ("a", "c"):
        assert split_docs(tmp_path / name, "train") and split_docs(tmp_path / name, "val")


@pytest.mark.parametrize("val_fraction", [1e-9, 0.999999])
def test_both_splits_non_empty_at_extremes(tmp_path, val_fraction):
    corpus = write_corpus(tmp_path / "corpus", {"x.txt": "one", "y.txt": "two", "z.txt": "three"})
    meta = prepare([str(corpus)], tmp_path / "out", val_fraction=val_fraction, progress=False)
    assert meta["documents"]["train"] >= 1 and meta["documents"]["val"] >= 1
    assert_round_trip(tmp_path / "out", ["one", "two", "three"])


def test_default_corpus_is_the_stdlib(tmp_path):
    files = default_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and files == sorted(files)
    assert stdlib / "json" / "__init__.py" in files
    for path in files:
        assert path.suffix == ".py" and path.is_relative_to(stdlib)
        assert not {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(stdlib).parts)
    sample = files[:20]
    meta = prepare([str(p) for p in sample], tmp_path / "out", val_fraction=0.2, progress=False)
    expected = [p.read_bytes().decode("utf-8", errors="replace") for p in sample]
    assert_round_trip(tmp_path / "out", [t for t in expected if t])
    assert meta["sources"] == 20


def test_resolve_inputs(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "z.txt").write_text("z")
    (corpus / "skip.bin").write_bytes(b"\x00")
    files = resolve_inputs([str(corpus)])
    assert files == sorted(files) and corpus / "sub" / "z.txt" in files and corpus / "skip.bin" not in files
    assert resolve_inputs([str(corpus / "a.txt"), str(corpus / "**" / "*.txt"), str(corpus / "a.txt")]) == [
        corpus / "a.txt", corpus / "d.txt", corpus / "f.txt", corpus / "g.txt", corpus / "h.txt",
        corpus / "sub" / "z.txt"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match=r"\*\.csv"):
        resolve_inputs([str(corpus / "*.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no files"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="non-empty"):
        resolve_inputs([])


def test_empty_corpus_and_bad_options(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {"a.txt": "", "b.txt": ""})
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare([str(corpus)], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(corpus)], tmp_path / "out", val_fraction=1.5, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        prepare([str(corpus)], tmp_path / "out", tokenizer=str(tmp_path / "missing.json"), progress=False)
    with pytest.raises(FileNotFoundError, match="sparsemixer-ds prepare"):
        open_split(tmp_path / "nowhere", "train")


def token_file(tmp_path, n: int, dtype: str = "uint16") -> TokenFile:
    """A token file holding 0, 1, ..., n-1 (mod the dtype), so every position is recognisable."""
    path = tmp_path / f"tokens_{n}.bin"
    (np.arange(n) % 60000).astype(np.dtype(dtype).newbyteorder("<")).tofile(path)
    return TokenFile(path, dtype)


class Batches:
    """The training loader over one token file, as a run of one source (data.path) uses it."""

    def __init__(self, tokens, seq_len, micro_batch, dp_rank, dp_world, accum_steps=1, seed=0):
        self.loader = Mixture([tokens], [1.0], seq_len, micro_batch, dp_rank, dp_world, accum_steps, seed)
        self.num_windows = int(self.loader.num_windows[0])

    def windows(self, step, micro):
        sources, windows = self.loader.windows(step, micro)
        assert (sources == 0).all()
        return windows

    def get(self, step, micro):
        return self.loader.get(step, micro)


def test_batches_shapes_and_shift(tmp_path):
    tokens = token_file(tmp_path, 1001)
    loader = Batches(tokens, seq_len=10, micro_batch=3, dp_rank=1, dp_world=2, accum_steps=2, seed=5)
    assert loader.num_windows == 100 and len(tokens) == 1001
    x, y = loader.get(step=3, micro=1)
    assert x.shape == y.shape == (3, 10) and x.dtype == y.dtype == torch.int64
    raw = np.fromfile(tokens.path, dtype="<u2")
    for row, w in enumerate(loader.windows(3, 1)):
        assert x[row].tolist() == raw[w * 10: w * 10 + 10].tolist()
        assert y[row].tolist() == raw[w * 10 + 1: w * 10 + 11].tolist()


def test_batches_deterministic_and_rank_disjoint(tmp_path):
    tokens = token_file(tmp_path, 2401)  # 120 windows: two optimizer steps of 60 draws per epoch
    world, accum, mb = 4, 3, 5
    make = lambda rank: Batches(tokens, seq_len=20, micro_batch=mb, dp_rank=rank, dp_world=world,
                                accum_steps=accum, seed=7)
    loaders, fresh = [make(r) for r in range(world)], [make(r) for r in range(world)]
    # History must not matter: walk one set of loaders through other steps first.
    for step in range(4):
        for micro in range(accum):
            loaders[0].get(step, micro)
    for step in (0, 1, 2, 3, 7):
        windows = []
        for rank in range(world):
            for micro in range(accum):
                a, b = loaders[rank].get(step, micro), fresh[rank].get(step, micro)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                windows.extend(loaders[rank].windows(step, micro).tolist())
        assert len(windows) == world * accum * mb == len(set(windows)), f"step {step}: ranks overlap"
    other_seed = Batches(tokens, seq_len=20, micro_batch=mb, dp_rank=0, dp_world=world, accum_steps=accum, seed=8)
    assert not np.array_equal(other_seed.windows(0, 0), loaders[0].windows(0, 0))


def test_batches_epoch_covers_every_window_once(tmp_path):
    tokens = token_file(tmp_path, 241)
    world, mb, n = 2, 3, 24  # 24 windows, 6 draws per step: an epoch is exactly 4 steps
    loaders = [Batches(tokens, seq_len=10, micro_batch=mb, dp_rank=r, dp_world=world, seed=1) for r in range(world)]
    assert loaders[0].num_windows == n
    epochs = []
    for first in (0, 4):
        drawn = [w for step in range(first, first + 4) for r in range(world) for w in loaders[r].windows(step, 0)]
        assert sorted(drawn) == list(range(n))
        epochs.append(drawn)
    assert epochs[0] != epochs[1], "each epoch must be a fresh permutation"
    expected = np.random.default_rng([1, 1]).permutation(n)
    assert epochs[1] == [int(expected[(g - n)]) for g in range(n, 2 * n)]


def test_batches_too_long_seq_len(tmp_path):
    tokens = token_file(tmp_path, 100)
    with pytest.raises(ValueError, match=r"seq_len=50.*shorter sequences"):
        Batches(tokens, seq_len=50, micro_batch=2, dp_rank=0, dp_world=2)
    loader = Batches(tokens, seq_len=9, micro_batch=2, dp_rank=0, dp_world=2)
    with pytest.raises(ValueError, match="micro"):
        loader.get(0, 1)


def test_eval_batches_disjoint_equal_counts(tmp_path):
    tokens = token_file(tmp_path, 1001)  # 100 windows of 10
    world, batch = 3, 4
    per_rank = [eval_batches(tokens, 10, batch, r, world, max_batches=50) for r in range(world)]
    assert [len(b) for b in per_rank] == [100 // (batch * world)] * world
    starts = [int(x[i, 0]) // 10 for batches in per_rank for x, _ in batches for i in range(batch)]
    assert len(starts) == len(set(starts)) and set(starts) == set(range(len(starts)))
    for batches in per_rank:
        for x, y in batches:
            assert x.shape == (batch, 10) and torch.equal(x[:, 1:], y[:, :-1])
    capped = [eval_batches(tokens, 10, batch, r, world, max_batches=2) for r in range(world)]
    assert [len(b) for b in capped] == [2] * world
    assert eval_batches(tokens, 10, batch, 0, world, 2)[0][0].tolist() == per_rank[0][0][0].tolist()
    with pytest.raises(ValueError, match=r"fewer than batch \* dp_world = 120"):
        eval_batches(tokens, 10, 40, 0, 3, max_batches=1)


def test_open_split_reads_prepared_data(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    meta = prepare([str(corpus)], tmp_path / "out", val_fraction=0.3, progress=False)
    train, val = open_split(tmp_path / "out", "train"), open_split(tmp_path / "out", "val")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert train.data.dtype == np.dtype("<u2") and not train.data.flags.writeable
    assert int(train[len(train) - 1]) == ByteTokenizer.eos_id


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    calls = []

    def encode_then_fail(self, text, dtype):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.array(list(text.encode("utf-8")) + [self.eos_id], dtype)

    # One worker: the interruption comes in this process (a worker's comes back to it: test_prepare.py).
    monkeypatch.setattr(ByteTokenizer, "encode_document", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "out", progress=True, workers=1)
    assert list((tmp_path / "out").iterdir()) == []
    assert "tokenize" in capsys.readouterr().err, "the progress bar goes to stderr"
