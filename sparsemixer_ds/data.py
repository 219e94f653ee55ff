"""Prepared data: its meta.json, its tokenizer, and the deterministic, resumable, rank-disjoint loader.

``prepare`` (prepare.py, re-exported here with the corpus readers) streams documents through a tokenizer
into ``train.bin`` / ``val.bin`` (raw little-endian token ids, each document followed by the eos id) plus
``meta.json``. A token file is read in fixed windows of T + 1 tokens: the training loader (mixture.py)
serves them in an order that is a pure function of (seed, step, micro, rank); ``eval_batches`` takes
the validation split's first ones.

Shape legend: B micro-batch (sequences), T sequence length (tokens), W windows.
"""
import json
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .config import ConfigError
from .corpus import ENCODING_ERRORS, TEXT_SUFFIXES, default_corpus, iter_documents, resolve_inputs
from .prepare import prepare
from .tokenizer import EOS_TOKEN, TOKENIZERS, BpeTokenizer, ByteTokenizer

__all__ = ["ByteTokenizer", "BpeTokenizer", "load_tokenizer", "tokenizer_record", "default_corpus", "resolve_inputs",
           "iter_documents", "prepare", "read_meta", "model_vocab_size", "TokenFile", "open_split",
           "eval_batches", "EOS_TOKEN", "TEXT_SUFFIXES", "ENCODING_ERRORS"]

DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")


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
    return _shifted([tokens.data[w * seq_len: (w + 1) * seq_len + 1] for w in windows])


def _shifted(rows: List[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windows of T + 1 tokens -> inputs and next-token targets, int64 [W, T] each."""
    rows_WT1 = torch.from_numpy(np.stack(rows).astype(np.int64))
    return rows_WT1[:, :-1].contiguous(), rows_WT1[:, 1:].contiguous()


def _num_windows(tokens: TokenFile, seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1; got {seq_len!r}")
    # Each window needs one token beyond its end for the last target.
    return max(len(tokens) - 1, 0) // seq_len


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


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
