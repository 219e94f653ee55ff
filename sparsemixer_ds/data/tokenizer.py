"""The tokenizers a corpus is prepared with: UTF-8 bytes, or a byte-level BPE from the ``tokenizers`` library.

Light to import (no torch), so prepare's worker processes can build one cheaply.
"""
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["EOS_TOKEN", "TOKENIZERS", "ByteTokenizer", "BpeTokenizer"]

EOS_TOKEN = "<|endoftext|>"
TOKENIZERS = ("bytes", "bpe")


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

    def encode_document(self, text: str, dtype: np.dtype) -> np.ndarray:
        """``encode(text)`` then eos, as an array of ``dtype`` [n + 1] (what prepare writes)."""
        data = text.encode("utf-8", errors="replace")
        ids = np.empty(len(data) + 1, dtype)
        ids[:-1] = np.frombuffer(data, np.uint8)
        ids[-1] = self.eos_id
        return ids


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

    def to_json(self) -> str:
        """The tokenizer.json text (what ``from_json`` takes): how prepare hands the tokenizer to its workers."""
        return self._tokenizer.to_str()

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_document(self, text: str, dtype: np.dtype) -> np.ndarray:
        """``encode(text)`` then eos, as an array of ``dtype`` [n + 1] (what prepare writes)."""
        ids = self.encode(text)
        ids.append(self.eos_id)
        return np.asarray(ids, dtype=dtype)
