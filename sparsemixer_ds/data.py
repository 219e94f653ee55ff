"""Corpus -> token file, and the deterministic, resumable, rank-disjoint loader that reads it back.

``prepare`` streams documents through a tokenizer into ``train.bin`` / ``val.bin`` (raw little-endian
token ids, each document followed by the eos id) plus ``meta.json``. ``Batches`` cuts a token file into
fixed windows and serves them in an order that is a pure function of (seed, step, micro, rank), so a
resumed run sees exactly the batches it would have seen and ranks never read the same window in a step.

Shape legend: B micro-batch (sequences), T sequence length (tokens), W windows.
"""
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .config import ConfigError

__all__ = ["ByteTokenizer", "BpeTokenizer", "load_tokenizer", "tokenizer_record", "default_corpus", "resolve_inputs",
           "iter_documents", "prepare", "read_meta", "model_vocab_size", "TokenFile", "open_split", "Batches",
           "eval_batches"]

EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")
DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")
TOKENIZERS = ("bytes", "bpe")
# What prepare does with a document that is not UTF-8 text: refuse it, keep it with U+FFFD for each
# invalid byte, or leave it out.
ENCODING_ERRORS = ("strict", "replace", "skip")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus eos = 256: no training, nothing to save."""
    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> List[int]:
        # "replace" only matters for lone surrogates (possible from JSON escapes), which UTF-8 cannot hold.
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class BpeTokenizer:
    """Byte-level BPE from the ``tokenizers`` library: every text encodes, and decodes back exactly."""
    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        # A tokenizer.json made elsewhere may lack our separator; adding it reuses its id if the vocab has it.
        tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        # Documents that contain the literal text "<|endoftext|>" must not produce eos in the middle of them.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.eos_id: int = tokenizer.token_to_id(EOS_TOKEN)
        self.vocab_size: int = max(tokenizer.get_vocab_size(with_added_tokens=True), self.eos_id + 1)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BpeTokenizer":
        """Train locally on ``texts`` (consumed once, streamed); the vocab may end smaller on a small corpus."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be an integer >= 257 (256 bytes + eos); got {vocab_size!r}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # The full byte alphabet up front, so bytes unseen in training still encode (no unknown token).
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "BpeTokenizer":
        """Load a local tokenizer.json (never the hub)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; pass a tokenizer.json "
                                    "written by `tokenizers` (or use tokenizer 'bytes' / 'bpe')")
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> "BpeTokenizer":
        """Build from the text of a tokenizer.json (as stored inside an export)."""
        try:
            return cls(Tokenizer.from_str(text))
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{source!r} is not a valid tokenizers tokenizer.json: {err}") from err

    def save(self, path: Union[str, Path]) -> None:
        self._tokenizer.save(str(path))

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def read_meta(data_dir: Path) -> dict:
    """A prepared data directory's meta.json: tokenizer, vocabulary size, token dtype, token counts.
    A ValueError names the file and what is wrong if it lacks what the readers of the data need."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(Path(data_dir))!r} has no meta.json; prepare it first: "
                                f"sparsemixer-ds prepare --out {data_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = f"is not valid JSON ({err})"
    else:
        problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path} {problem}; it is written by `sparsemixer-ds prepare`: delete {data_dir} and "
                         f"prepare it again (sparsemixer-ds prepare [INPUT ...] --out {data_dir})")
    return meta


# What the readers of a data directory need of its meta.json: key -> (test, what the value must be).
_META_KEYS = {
    "tokenizer": (lambda value: value in TOKENIZERS, f"one of {', '.join(TOKENIZERS)}"),
    "vocab_size": (lambda value: type(value) is int and value >= 1, "an integer >= 1"),
    "dtype": (lambda value: value in DTYPES, f"one of {', '.join(DTYPES)}"),
}


def _meta_problem(meta) -> Optional[str]:
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for key, (test, wanted) in _META_KEYS.items():
        if key not in meta:
            return f"has no '{key}' ({wanted})"
        if not test(meta[key]):
            return f"has '{key}': {json.dumps(meta[key])}, not {wanted}"
    return None


def model_vocab_size(data_dir: Path, vocab_size: int) -> int:
    """The vocabulary a model of ``data_dir`` needs: the data's for ``vocab_size`` 0, else ``vocab_size``,
    which must cover every token id in the data (one pass over each memory map)."""
    meta = read_meta(data_dir)
    if vocab_size == 0:
        vocab_size = meta["vocab_size"]
    elif vocab_size < meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the data's vocabulary "
                          f"({meta['vocab_size']} in {data_dir}/meta.json); set it to 0 to take the data's")
    for split in SPLITS:
        tokens = open_split(data_dir, split)
        if len(tokens) and int(tokens.data.max()) >= vocab_size:
            raise ConfigError(f"{tokens.path} holds token id {int(tokens.data.max())}, outside the vocabulary of "
                              f"{vocab_size}; the token file does not belong to this meta.json or "
                              "model.vocab_size is too small (prepare the data again, or set model.vocab_size=0)")
    return vocab_size


def load_tokenizer(data_dir: Path) -> Union[ByteTokenizer, BpeTokenizer]:
    """The tokenizer a prepared data directory was written with (from its meta.json)."""
    if read_meta(data_dir)["tokenizer"] == "bytes":
        return ByteTokenizer()
    return BpeTokenizer.from_file(Path(data_dir) / "tokenizer.json")


def tokenizer_record(data_dir: Path) -> dict:
    """What generation needs of a data directory's tokenizer, for storing inside an export:
    ``{"kind": "bytes" | "bpe", "json": the tokenizer.json text or None}``."""
    kind = read_meta(data_dir)["tokenizer"]
    return {"kind": kind, "json": (Path(data_dir) / "tokenizer.json").read_text() if kind == "bpe" else None}


def default_corpus() -> List[Path]:
    """Every ``*.py`` of the running interpreter's standard library (no site-packages), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(stdlib).parts))


def resolve_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files, directories (recursively, text suffixes only) and glob patterns -> a list of files.

    Each directory or pattern is expanded in sorted order; the result keeps the order of ``inputs`` and
    lists each file once.
    """
    if isinstance(inputs, (str, Path)) or not inputs:
        raise ValueError(f"inputs must be a non-empty list of files, directories or glob patterns; got {inputs!r}")
    found: List[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"directory {item!r} holds no files with suffix {', '.join(TEXT_SUFFIXES)}; "
                                 "point at the text files or a glob pattern that matches them")
        elif glob.has_magic(item):
            files = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not files:
                raise ValueError(f"glob pattern {item!r} matches no files; check the pattern "
                                 "('**' needs to stand alone between slashes to recurse)")
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file, a directory nor a glob pattern that exists")
        found.extend(files)
    seen, unique = set(), []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _decode(data: bytes, key: str, offset: int, encoding_errors: str, not_text: Optional[Set[str]]) -> Optional[str]:
    """The UTF-8 text of document ``key`` (``data``, found at byte ``offset`` of its file), or, if it is
    not text (invalid UTF-8, or a NUL byte: a binary file): a ValueError naming it ("strict"), the text
    with U+FFFD for each invalid byte ("replace"), None ("skip"); its key goes into ``not_text``."""
    nul = data.find(b"\0")
    if nul < 0:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {offset + err.start} ({err.reason})"
    else:
        problem = f"a binary file, not text: a NUL byte at byte offset {offset + nul}"
    if encoding_errors == "strict":
        raise ValueError(f"{key}: {problem}; convert it to UTF-8 or leave it out of the inputs, or pass "
                         "--encoding-errors skip (leaves such documents out) or replace (keeps them, with U+FFFD "
                         "for each invalid byte)")
    if not_text is not None:
        not_text.add(key)
    return data.decode("utf-8", errors="replace") if encoding_errors == "replace" else None


def iter_documents(paths: Iterable[Union[str, Path]], text_field: str = "text", encoding_errors: str = "strict",
                   not_text: Optional[Set[str]] = None) -> Iterator[Tuple[str, str]]:
    """Yield (key, text) per non-empty document: a plain file is one, a ``.jsonl`` line is one.

    Keys are the path string, or ``f"{path}:{line_number}"`` (1-based) for jsonl lines. A document that
    is not UTF-8 text is refused, kept with U+FFFD replacements or left out, as ``encoding_errors``
    (one of ENCODING_ERRORS) says; the keys of such documents are added to ``not_text``.
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}; got {encoding_errors!r}")
    for path in map(Path, paths):
        # Bytes, decoded here: "\r\n" stays as written, so decoding the tokens gives back the file's exact text.
        with open(path, "rb") as f:
            if path.suffix != ".jsonl":
                text = _decode(f.read(), str(path), 0, encoding_errors, not_text)
                if text:
                    yield str(path), text
                continue
            offset = 0
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, f"{path}:{number}", offset, encoding_errors, not_text)
                offset += len(raw)
                if line is None or not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{str(path)}:{number}: not valid JSON ({err}); each line must be an object "
                                     f"with a string field {text_field!r}") from err
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{str(path)}:{number}: no string field {text_field!r} (got {got}); "
                                     "pass text_field= naming the field that holds the text")
                if obj[text_field]:
                    yield f"{path}:{number}", obj[text_field]


def _unit_hash(seed: int, key: str) -> float:
    """sha256 of (seed, key) as a number in [0, 1): stable across runs, machines and PYTHONHASHSEED."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _val_keys(paths: Sequence[Path], text_field: str, val_fraction: float, seed: int, progress: bool,
              encoding_errors: str, not_text: Set[str]) -> set:
    """The keys of the validation documents; a scan of the corpus that keeps only those keys (and
    refuses, or notes in ``not_text``, the documents that are not UTF-8 text)."""
    val, count, lowest, highest = set(), 0, (2.0, ""), (-1.0, "")
    for path in tqdm(paths, desc="split", unit="file", disable=not progress, file=sys.stderr):
        for key, _ in iter_documents([path], text_field, encoding_errors, not_text):
            h = _unit_hash(seed, key)
            count += 1
            lowest, highest = min(lowest, (h, key)), max(highest, (h, key))
            if h < val_fraction:
                val.add(key)
    if count == 0:
        raise ValueError(f"the corpus ({len(paths)} files) holds no non-empty documents; "
                         f"check the inputs (and text_field={text_field!r} for jsonl)")
    # A small corpus can hash every document to one side; move the one nearest the cut across.
    if val_fraction > 0 and count >= 2:
        if not val:
            val.add(lowest[1])
        elif len(val) == count:
            val.discard(highest[1])
    return val


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
            encoding_errors: Optional[str] = None) -> dict:
    """Tokenize a corpus into ``out_dir/{train,val}.bin`` + ``meta.json`` (+ ``tokenizer.json`` for BPE).

    inputs: files / directories / globs, or None for the standard library sources. tokenizer: "bytes",
    "bpe" (trained on the training documents with ``vocab_size``) or a path to a tokenizer.json.
    The split is by document and depends only on (seed, document key); the key holds the path as given
    (see iter_documents), so the same corpus passed by another path splits differently.
    encoding_errors: what happens to a document that is not UTF-8 text (ENCODING_ERRORS, see
    iter_documents); None: "strict" for ``inputs``, "replace" for the standard library, whose test
    suite holds a few sources in other encodings on purpose (4 in CPython 3.11, each declaring its
    encoding; replacing their few non-UTF-8 bytes keeps the rest of them, and the token files the
    same as before this option existed). Such documents are counted in meta.json
    (``not_text_documents``). ``out_dir`` must not hold prepared data already. Returns the meta dict.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1) (0.01 is usual); got {val_fraction!r}")
    if tokenizer not in TOKENIZERS and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} is neither 'bytes', 'bpe' nor an existing tokenizer.json")
    if encoding_errors is None:
        encoding_errors = "replace" if inputs is None else "strict"
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    paths = default_corpus() if inputs is None else resolve_inputs(inputs)
    not_text: Set[str] = set()
    val = _val_keys(paths, text_field, val_fraction, seed, progress, encoding_errors, not_text)
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = BpeTokenizer.train((text for key, text in iter_documents(paths, text_field, encoding_errors)
                                  if key not in val), vocab_size)
    else:
        tok = BpeTokenizer.from_file(tokenizer)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    np_dtype = np.dtype(dtype).newbyteorder("<")

    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["train.bin", "val.bin", "meta.json"] + (["tokenizer.json"] if tok.kind == "bpe" else [])
    # Everything goes to temporary names first and is renamed at the end (meta.json last), so an
    # interrupted run never leaves a token file that looks finished.
    tmp = {name: out_dir / f".{name}.tmp{os.getpid()}" for name in names}
    tokens = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    try:
        with open(tmp["train.bin"], "wb", buffering=1 << 20) as f_train, \
                open(tmp["val.bin"], "wb", buffering=1 << 20) as f_val:
            for path in tqdm(paths, desc="tokenize", unit="file", disable=not progress, file=sys.stderr):
                for key, text in iter_documents([path], text_field, encoding_errors):
                    split = "val" if key in val else "train"
                    ids = tok.encode(text)
                    ids.append(tok.eos_id)
                    (f_val if split == "val" else f_train).write(np.asarray(ids, dtype=np_dtype).tobytes())
                    tokens[split] += len(ids)
                    documents[split] += 1
        meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": dtype,
                "train_tokens": tokens["train"], "val_tokens": tokens["val"], "documents": documents,
                "val_fraction": val_fraction, "seed": seed, "sources": len(paths), "text_field": text_field,
                "encoding_errors": encoding_errors, "not_text_documents": len(not_text)}
        if tok.kind == "bpe":
            tok.save(tmp["tokenizer.json"])
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name in names:
            os.replace(tmp[name], out_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return meta


class TokenFile:
    """A read-only view of a ``.bin`` token file: ``len()`` tokens, indexable like a 1-D numpy array."""

    def __init__(self, path: Path, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"token dtype must be one of {DTYPES}; got {dtype!r}")
        self.path, self.dtype = Path(path), dtype
        np_dtype = np.dtype(dtype).newbyteorder("<")
        size = self.path.stat().st_size
        if size % np_dtype.itemsize:
            raise ValueError(f"{str(self.path)!r} has {size} bytes, not a whole number of {dtype} tokens; "
                             "the file is truncated or the dtype is wrong: rerun `sparsemixer-ds prepare`")
        # numpy cannot memory-map an empty file, and an empty val.bin is legal (val_fraction=0).
        self.data = np.memmap(self.path, dtype=np_dtype, mode="r") if size else np.zeros(0, np_dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


def open_split(data_dir: Path, split: str) -> TokenFile:
    """``data_dir/{split}.bin`` with the dtype its meta.json records."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run `sparsemixer-ds prepare` to write it")
    return TokenFile(path, meta["dtype"])


def _windows_to_batch(tokens: TokenFile, windows: np.ndarray, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of the given windows: int64 [W, T] each."""
    rows_WT1 = np.stack([tokens.data[w * seq_len: (w + 1) * seq_len + 1] for w in windows]).astype(np.int64)
    rows = torch.from_numpy(rows_WT1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _num_windows(tokens: TokenFile, seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1; got {seq_len!r}")
    # Each window needs one token beyond its end for the last target.
    return max(len(tokens) - 1, 0) // seq_len


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


class Batches:
    """The training loader: micro-batches as a pure function of (seed, step, micro, rank).

    Draw number g = ((step * accum_steps + micro) * dp_world + dp_rank) * micro_batch + i walks a fresh
    permutation of the N windows each epoch, so the ranks of one optimizer step read disjoint windows and
    a resumed run needs nothing but the step number.
    """
    _CACHED_EPOCHS = 4

    def __init__(self, tokens: TokenFile, seq_len: int, micro_batch: int, dp_rank: int, dp_world: int,
                 accum_steps: int = 1, seed: int = 0):
        _check_positive(micro_batch=micro_batch, dp_world=dp_world, accum_steps=accum_steps)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be an integer in 0..{dp_world - 1} (dp_world={dp_world}); got {dp_rank!r}")
        self.num_windows = _num_windows(tokens, seq_len)
        if self.num_windows < dp_world * micro_batch:
            raise ValueError(f"{len(tokens)} tokens in {str(tokens.path)!r} give {self.num_windows} windows of "
                             f"seq_len={seq_len}, fewer than dp_world * micro_batch = {dp_world * micro_batch}; "
                             "use shorter sequences, a smaller batch or more data")
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.dp_rank, self.dp_world, self.accum_steps, self.seed = dp_rank, dp_world, accum_steps, seed
        self._perms: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if len(self._perms) > self._CACHED_EPOCHS:
                self._perms.popitem(last=False)
        self._perms.move_to_end(epoch)
        return self._perms[epoch]

    def windows(self, step: int, micro: int) -> np.ndarray:
        """Window indices of this rank's micro-batch ``micro`` of optimizer step ``step``: int64 [B]."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0; got {step!r}")
        if not 0 <= micro < self.accum_steps:
            raise ValueError(f"micro must be in 0..{self.accum_steps - 1} (accum_steps={self.accum_steps}); "
                             f"got {micro!r}")
        first = ((int(step) * self.accum_steps + micro) * self.dp_world + self.dp_rank) * self.micro_batch
        draws = np.arange(first, first + self.micro_batch, dtype=np.int64)
        epochs, slots = draws // self.num_windows, draws % self.num_windows
        return np.array([self._perm(int(e))[s] for e, s in zip(epochs, slots)], dtype=np.int64)

    def get(self, step: int, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (inputs shifted by one token): int64 [B, T] each."""
        return _windows_to_batch(self.tokens, self.windows(step, micro), self.seq_len)


def eval_batches(tokens: TokenFile, seq_len: int, batch: int, dp_rank: int, dp_world: int,
                 max_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches: (inputs, targets), int64 [batch, T] each, the same count on every rank.

    The first ``min(N, max_batches * batch * dp_world)`` windows in file order, cut into one contiguous
    block per rank (the remainder that would leave ranks uneven is dropped).
    """
    _check_positive(batch=batch, dp_world=dp_world, max_batches=max_batches)
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank must be an integer in 0..{dp_world - 1} (dp_world={dp_world}); got {dp_rank!r}")
    num_windows = _num_windows(tokens, seq_len)
    per_rank = min(num_windows, max_batches * batch * dp_world) // (batch * dp_world)
    if per_rank == 0:
        raise ValueError(f"the validation split {str(tokens.path)!r} has {len(tokens)} tokens = {num_windows} "
                         f"windows of seq_len={seq_len}, fewer than batch * dp_world = {batch * dp_world}; "
                         "raise val_fraction in prepare, or use shorter sequences or a smaller eval batch")
    start = dp_rank * per_rank * batch
    return [_windows_to_batch(tokens, np.arange(start + b * batch, start + (b + 1) * batch), seq_len)
            for b in range(per_rank)]
