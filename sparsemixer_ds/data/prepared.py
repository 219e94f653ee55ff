"""A prepared data directory: its meta.json, its tokenizer and its token files.

``prepare`` (prepare.py) streams documents through a tokenizer into ``train.bin`` / ``val.bin`` (raw
little-endian token ids, each document followed by the eos id) plus ``meta.json``; the loader
(loader.py) reads the token files in windows.
"""
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..config import ConfigError
from .tokenizer import TOKENIZERS, BpeTokenizer, ByteTokenizer

__all__ = ["load_tokenizer", "tokenizer_record", "read_meta", "model_vocab_size", "TokenFile", "open_split"]

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
