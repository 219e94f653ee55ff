"""Corpus -> ``train.bin`` / ``val.bin`` (raw little-endian token ids, each document followed by eos) + ``meta.json``.

Three passes over the corpus's work units (corpus.py), the first and last spread over worker processes:

1. split scan (parallel): each unit's document count, its share of validation documents and its
   lowest / highest (hash, key), so the main process can fix the split (``Split``) without holding keys;
2. BPE only: train the tokenizer on the training documents, read in the main process as before;
3. encode (parallel): each unit's train and val tokens, written by the main process in unit order.

Results are taken in unit order, so the files are byte-identical whatever the number of workers. Memory is
bounded: at most ``2 * workers`` units are in flight, each a few MB of input (UNIT_BYTES).

Workers are forked (this module and its readers are already imported; a fresh interpreter would import
torch through the package) before the BPE is trained, and get the tokenizer as tokenizer.json text with
their units.
"""
import hashlib
import json
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from .corpus import (ENCODING_ERRORS, Reading, Tally, Unit, default_corpus, plan_units, resolve_inputs, unit_bytes,
                     unit_documents)
from .tokenizer import TOKENIZERS, BpeTokenizer, ByteTokenizer

__all__ = ["prepare", "default_workers", "Split"]

Tokenizer = Union[ByteTokenizer, BpeTokenizer]


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _unit_hash(seed: int, key: str) -> float:
    """sha256 of (seed, key) as a number in [0, 1): stable across runs, machines and PYTHONHASHSEED."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class Split(NamedTuple):
    """Which documents are validation: hash(seed, key) < val_fraction, except the one document a small
    corpus moves across (``to_val`` / ``to_train``) so that neither side is empty."""
    seed: int
    val_fraction: float
    to_val: Optional[str] = None
    to_train: Optional[str] = None

    def is_val(self, key: str) -> bool:
        if key == self.to_val or key == self.to_train:
            return key == self.to_val
        return _unit_hash(self.seed, key) < self.val_fraction


class Scan(NamedTuple):
    """Pass 1's result for some units: documents, of which validation, the extreme (hash, key), the tally."""
    documents: int
    val: int
    lowest: Tuple[float, str]
    highest: Tuple[float, str]
    tally: Tally


class Encoded(NamedTuple):
    """Pass 3's result for one unit: its tokens (little-endian ``dtype`` bytes) and documents per split."""
    train: bytes
    val: bytes
    train_documents: int
    val_documents: int


def _scan(unit: Unit, reading: Reading, split: Split) -> Scan:
    documents, val, lowest, highest, tally = 0, 0, (2.0, ""), (-1.0, ""), Tally()
    for key, _ in unit_documents(unit, reading, tally):
        h = _unit_hash(split.seed, key)
        documents += 1
        val += h < split.val_fraction
        lowest, highest = min(lowest, (h, key)), max(highest, (h, key))
    return Scan(documents, val, lowest, highest, tally)


def _add(total: Scan, part: Scan) -> Scan:
    total.tally.merge(part.tally)
    return Scan(total.documents + part.documents, total.val + part.val, min(total.lowest, part.lowest),
                max(total.highest, part.highest), total.tally)


_worker_tokenizer: Dict[str, Tokenizer] = {}  # a worker's tokenizer, built once from its tokenizer.json text


def _tokenizer(spec: Union[Tokenizer, str]) -> Tokenizer:
    """The tokenizer itself in the main process; in a worker the tokenizer.json text ("" for bytes)."""
    if not isinstance(spec, str):
        return spec
    if spec not in _worker_tokenizer:
        _worker_tokenizer.clear()
        _worker_tokenizer[spec] = BpeTokenizer.from_json(spec) if spec else ByteTokenizer()
    return _worker_tokenizer[spec]


def _encode(unit: Unit, reading: Reading, split: Split, spec: Union[Tokenizer, str], dtype: str) -> Encoded:
    tok, np_dtype = _tokenizer(spec), np.dtype(dtype).newbyteorder("<")
    out = {False: bytearray(), True: bytearray()}
    documents = {False: 0, True: 0}
    for key, text in unit_documents(unit, reading, Tally()):
        is_val = split.is_val(key)
        out[is_val] += tok.encode_document(text, np_dtype).tobytes()
        documents[is_val] += 1
    return Encoded(bytes(out[False]), bytes(out[True]), documents[False], documents[True])


def _worker_start() -> None:
    # The main process handles Ctrl-C and ends the pool; a worker would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _pool(workers: int) -> Iterator[Optional[ProcessPoolExecutor]]:
    """``workers`` forked processes, all started now (None for one worker: everything runs in-process)."""
    if workers == 1:
        yield None
        return
    import multiprocessing

    # tokenizers warns in a child forked after its thread pool ran (an earlier BPE training in this
    # process); told its parallelism setting, it stays quiet, and a worker should use one core anyway.
    configured = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start)
        pool.submit(int).result()  # starts every worker (a fork pool starts them all at its first task)
    finally:
        if configured is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = configured
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered(pool: Optional[ProcessPoolExecutor], fn: Callable, units: Iterable[Unit], *args,
             window: int) -> Iterator[Tuple[Unit, object]]:
    """(unit, fn(unit, *args)) in unit order, at most ``window`` units submitted and not yet taken."""
    if pool is None:
        for unit in units:
            yield unit, fn(unit, *args)
        return
    pending: deque = deque()
    for unit in units:
        pending.append((unit, pool.submit(fn, unit, *args)))
        if len(pending) >= window:
            unit, future = pending.popleft()
            yield unit, future.result()
    while pending:
        unit, future = pending.popleft()
        yield unit, future.result()


def _bar(desc: str, total: int, progress: bool) -> tqdm:
    return tqdm(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr)


def _fix_split(scan: Scan, split: Split, paths: Sequence[Path], reading: Reading) -> Split:
    """The split with a small corpus's fix-up, or a ValueError if the corpus holds no document."""
    tally = scan.tally
    if tally.records and not tally.with_field:
        raise ValueError(f"no record of the corpus has a string field {reading.text_field!r} (the records have: "
                         f"{', '.join(sorted(tally.fields)) or 'no fields'}); pass --text-field (text_field=) "
                         "naming the field that holds the text")
    if scan.documents == 0:
        empty = [str(p) for p in paths if Path(p).stat().st_size == 0]
        found = (f"; {len(empty)} of them empty ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''})"
                 if empty else "")
        skipped = f"; {tally.malformed} malformed record(s) skipped" if tally.malformed else ""
        raise ValueError(f"the corpus ({len(paths)} files{found}{skipped}) holds no non-empty documents; "
                         f"check the inputs (and text_field={reading.text_field!r} for JSONL and Parquet)")
    # A small corpus can hash every document to one side; move the one nearest the cut across.
    if split.val_fraction > 0 and scan.documents >= 2:
        if scan.val == 0:
            return split._replace(to_val=scan.lowest[1])
        if scan.val == scan.documents:
            return split._replace(to_train=scan.highest[1])
    return split


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that is a file, lies under one, or already holds prepared data."""
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out_dir else f": {existing}"
        raise ValueError(f"output directory {out_dir}{where} is a file, not a directory; choose another --out")
    if (out_dir / "meta.json").exists():
        raise ValueError(f"output directory {out_dir} already holds prepared data ({out_dir / 'meta.json'}); choose "
                         "another --out, or delete it to prepare it again")


def prepare(inputs: Optional[Sequence[str]], out_dir: Path, tokenizer: str = "bytes", vocab_size: int = 4096,
            val_fraction: float = 0.01, seed: int = 0, text_field: str = "text", progress: bool = True,
            encoding_errors: Optional[str] = None, skip_malformed: bool = False,
            workers: Optional[int] = None) -> dict:
    """Tokenize a corpus into ``out_dir/{train,val}.bin`` + ``meta.json`` (+ ``tokenizer.json`` for BPE).

    inputs: files / directories / globs (plain text, JSONL, gzip / zstd compressed, Parquet: see corpus.py),
    or None for the standard library sources. tokenizer: "bytes", "bpe" (trained on the training documents
    with ``vocab_size``) or a path to a tokenizer.json.
    The split is by document and depends only on (seed, document key); the key holds the path as given
    (see corpus.py), so the same corpus passed by another path splits differently.
    encoding_errors: what happens to a document that is not UTF-8 text (ENCODING_ERRORS, see
    iter_documents); None: "strict" for ``inputs``, "replace" for the standard library, whose test
    suite holds a few sources in other encodings on purpose (4 in CPython 3.11, each declaring its
    encoding; replacing their few non-UTF-8 bytes keeps the rest of them, and the token files the
    same as before this option existed). Such documents are counted in meta.json
    (``not_text_documents``). skip_malformed: leave out malformed records (bad JSON, no string text
    field, a null Parquet row, a damaged compressed stream's rest), counted (``malformed_records``),
    instead of refusing the corpus. workers: processes that read and tokenize (default: the cores
    available, except 1 for the bytes tokenizer, whose work per byte costs less than handing it to
    another process: benchmarks/prepare.py; 1 runs in this process); the output is the same for any number.
    ``out_dir`` must not hold prepared data already; nothing is written until the corpus has been read
    once and found good. Returns the meta dict.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1) (0.01 is usual); got {val_fraction!r}")
    if tokenizer not in TOKENIZERS and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} is neither 'bytes', 'bpe' nor an existing tokenizer.json")
    if workers is None:
        workers = 1 if tokenizer == "bytes" else default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (processes that tokenize); got {workers!r}")
    if encoding_errors is None:
        encoding_errors = "replace" if inputs is None else "strict"
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}; got {encoding_errors!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    paths = default_corpus() if inputs is None else resolve_inputs(inputs)
    reading = Reading(text_field, encoding_errors, skip_malformed)
    total = unit_bytes(paths)
    window = 2 * workers

    with _pool(workers) as pool:
        scan = Scan(0, 0, (2.0, ""), (-1.0, ""), Tally())
        with _bar("split", total, progress) as bar:
            # The planning tally is pass 1's: a damaged compressed stream is met, and counted, while planning.
            units = plan_units(paths, reading, scan.tally)
            for unit, part in _ordered(pool, _scan, units, reading, Split(seed, val_fraction), window=window):
                scan = _add(scan, part)
                bar.update(unit.in_bytes)
        split = _fix_split(scan, Split(seed, val_fraction), paths, reading)

        if tokenizer == "bytes":
            tok: Tokenizer = ByteTokenizer()
        elif tokenizer == "bpe":
            texts = _training_texts(plan_units(paths, reading, Tally()), reading, split, progress, total)
            tok = BpeTokenizer.train(texts, vocab_size)
        else:
            tok = BpeTokenizer.from_file(tokenizer)
        dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
        spec = tok if pool is None else ("" if tok.kind == "bytes" else tok.to_json())

        out_dir.mkdir(parents=True, exist_ok=True)
        names = ["train.bin", "val.bin", "meta.json"] + (["tokenizer.json"] if tok.kind == "bpe" else [])
        # Everything goes to temporary names first and is renamed at the end (meta.json last), so an
        # interrupted run never leaves a token file that looks finished.
        tmp = {name: out_dir / f".{name}.tmp{os.getpid()}" for name in names}
        itemsize = np.dtype(dtype).itemsize
        documents = {"train": 0, "val": 0}
        try:
            with open(tmp["train.bin"], "wb", buffering=1 << 20) as f_train, \
                    open(tmp["val.bin"], "wb", buffering=1 << 20) as f_val, _bar("tokenize", total, progress) as bar:
                units = plan_units(paths, reading, Tally())
                for unit, part in _ordered(pool, _encode, units, reading, split, spec, dtype, window=window):
                    f_train.write(part.train)
                    f_val.write(part.val)
                    documents["train"] += part.train_documents
                    documents["val"] += part.val_documents
                    bar.update(unit.in_bytes)
                tokens = {"train": f_train.tell() // itemsize, "val": f_val.tell() // itemsize}
            meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": dtype,
                    "train_tokens": tokens["train"], "val_tokens": tokens["val"], "documents": documents,
                    "val_fraction": val_fraction, "seed": seed, "sources": len(paths), "text_field": text_field,
                    "encoding_errors": encoding_errors, "not_text_documents": scan.tally.not_text,
                    "malformed_records": scan.tally.malformed}
            if tok.kind == "bpe":
                tok.save(tmp["tokenizer.json"])
            tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            for name in names:
                os.replace(tmp[name], out_dir / name)
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)
    return meta


def _training_texts(units: Iterable[Unit], reading: Reading, split: Split, progress: bool,
                    total: int) -> Iterator[str]:
    """The training documents' texts, read here (the BPE trainer takes one stream)."""
    with _bar("bpe", total, progress) as bar:
        for unit in units:
            for key, text in unit_documents(unit, reading, Tally()):
                if not split.is_val(key):
                    yield text
            bar.update(unit.in_bytes)
