"""The loader: which source and which window each training sequence comes from, and the validation batches.

A token file is read in fixed windows of T + 1 tokens (inputs and next-token targets); ``eval_batches``
takes the validation split's first ones.

A run reads ``data.path`` (one source) or ``data.sources`` (several, with weights, sharing one
tokenizer). Training draws are numbered: draw g = ((step * accum_steps + micro) * dp_world + dp_rank)
* micro_batch + i. A fixed schedule of ``BLOCK`` draws, repeated, says which
source each draw takes: source s gets n_s = BLOCK * w_s / sum(w) of them (rounded, at least one),
spread evenly through the block (its j-th draw at position (j + 1/2) / n_s of the block, ties to the
earlier source). So every prefix of the draws holds each source's share to within one sequence, and
the number of draws source s has had before draw g has a closed form: that is the position in its own
stream of windows, which walks a fresh permutation each epoch and wraps around when the source runs
out; so the ranks of one step read distinct windows (within an epoch). Everything is a pure function
of (seed, step, micro, rank): a resumed run reads exactly the batches the uninterrupted one would have,
and tokens seen per source follow from the step alone. With one source, draw g is window
permutation(seed, g // N)[g % N] of its N.

Shape legend: B micro-batch (sequences), T sequence length, W windows, M draws per schedule block, N sources.
"""
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
import torch

from ..config import ConfigError, RunConfig, source_name
from .prepared import TokenFile, model_vocab_size, open_split, read_meta

__all__ = ["eval_batches", "Source", "data_sources", "tokenizer_dir", "check_sources", "Mixture", "validation_sets"]


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


class Source(NamedTuple):
    name: str  # how metrics and monitors call it
    path: Path  # the prepared data directory
    weight: float  # as configured; the mixture normalises the weights
    label: str  # where the config sets it, for messages: "data.path" or "data.sources[1] (web)"


def data_sources(cfg: RunConfig) -> List[Source]:
    """The run's sources: ``data.sources``, or ``data.path`` as a mixture of one."""
    if not cfg.data.sources:
        path = Path(cfg.data.path)
        return [Source(path.name or "data", path, 1.0, "data.path")]
    return [Source(source_name(s), Path(s.path), s.weight, f"data.sources[{i}] ({source_name(s)})")
            for i, s in enumerate(cfg.data.sources)]


def tokenizer_dir(cfg: RunConfig) -> Path:
    """A data directory holding the run's tokenizer (every source shares it): the first source."""
    return data_sources(cfg)[0].path


def _tokenizer_fingerprint(path: Path, meta: dict) -> Tuple[str, int, str]:
    """(kind, vocabulary size, sha256 of tokenizer.json or ""): equal for data prepared with one tokenizer."""
    digest = ""
    if meta["tokenizer"] == "bpe":
        digest = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()
    return meta["tokenizer"], meta["vocab_size"], digest


def check_sources(cfg: RunConfig) -> int:
    """Check every source before any rank starts: a prepared directory (meta.json), one tokenizer for
    all, token ids inside the model's vocabulary. Returns model.vocab_size (0 in the config: the data's).
    Each ConfigError names the source and the fix."""
    sources = data_sources(cfg)
    first: Tuple[Source, Tuple[str, int, str]] = None
    for source in sources:
        try:
            meta = read_meta(source.path)
            if meta["tokenizer"] == "bpe" and not (source.path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{source.path} was prepared with a BPE tokenizer but holds no "
                                        "tokenizer.json; prepare it again")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{source.label}: {err}") from None
        fingerprint = _tokenizer_fingerprint(source.path, meta)
        if first is None:
            first = source, fingerprint
        elif fingerprint != first[1]:
            (kind, vocab, _), (kind0, vocab0, _) = fingerprint, first[1]
            what = (f"a {kind} tokenizer with vocabulary {vocab}, {first[0].label} a {kind0} one with {vocab0}"
                    if (kind, vocab) != (kind0, vocab0) else "another tokenizer.json")
            raise ConfigError(f"{source.label} ({source.path}) was prepared with {what}; all sources of a "
                              f"mixture must share one tokenizer: prepare them with the same --tokenizer (e.g. "
                              f"--tokenizer {first[0].path / 'tokenizer.json'} for BPE)")
    vocab_size = cfg.model.vocab_size
    for source in sources:
        try:
            vocab_size = model_vocab_size(source.path, vocab_size)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{source.label}: {err}") from None
    return vocab_size


# Draws per schedule block: the weights' resolution (a share rounds to a multiple of 1 / BLOCK).
BLOCK = 1 << 16


def _schedule(weights: np.ndarray, block: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The draws of a source per block (n, int64 [N]), the source of each position (int64 [M]) and how many
    of its source's draws come before it in the block (int64 [M])."""
    share = weights / weights.sum() * block
    n = np.maximum(np.floor(share).astype(np.int64), 1)
    # Largest remainders first, until the block is full (or over-full by the sources raised to one draw).
    for s in np.argsort(-(share - np.floor(share)), kind="stable")[:max(block - int(n.sum()), 0)]:
        n[s] += 1
    while n.sum() > block:  # only when tiny weights were raised to one draw: take from the largest
        n[np.argmax(n)] -= 1
    source = np.repeat(np.arange(len(n)), n)
    within = np.concatenate([np.arange(k) for k in n])
    order = np.lexsort((source, (within + 0.5) / n[source]))  # by position in the block, ties to the earlier source
    return n, source[order], within[order]


class Mixture:
    """The training loader over weighted sources: micro-batches as a pure function of (seed, step, micro, rank).

    ``tokens``: each source's training TokenFile; ``weights``: their (relative) shares of the draws. Every
    micro-batch holds sequences of several sources in the schedule's proportions."""
    _CACHED_EPOCHS = 4

    def __init__(self, tokens: List[TokenFile], weights: List[float], seq_len: int, micro_batch: int, dp_rank: int,
                 dp_world: int, accum_steps: int = 1, seed: int = 0, names: List[str] = None):
        _check_positive(micro_batch=micro_batch, dp_world=dp_world, accum_steps=accum_steps)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be an integer in 0..{dp_world - 1} (dp_world={dp_world}); got {dp_rank!r}")
        if not tokens or len(weights) != len(tokens) or not all(w > 0 for w in weights):
            raise ValueError(f"a mixture needs one positive weight per source; got {len(tokens)} sources, "
                             f"weights {weights}")
        self.names = list(names) if names is not None else [str(t.path.parent.name) for t in tokens]
        self.num_windows = np.array([_num_windows(t, seq_len) for t in tokens], dtype=np.int64)
        for t, name, windows in zip(tokens, self.names, self.num_windows):
            if windows < dp_world * micro_batch:
                raise ValueError(f"{len(t)} tokens in {str(t.path)!r} ({name}) give {windows} windows of "
                                 f"seq_len={seq_len}, fewer than dp_world * micro_batch = {dp_world * micro_batch}; "
                                 "use shorter sequences, a smaller batch or more data")
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.dp_rank, self.dp_world, self.accum_steps, self.seed = dp_rank, dp_world, accum_steps, seed
        self.block = BLOCK if len(tokens) > 1 else 1  # one source: draw g is its g-th draw
        self.per_block, self.source_at, self.index_at = _schedule(np.asarray(weights, dtype=np.float64), self.block)
        # counts_before[s, r]: draws of source s among the block's first r positions.
        self.counts_before = np.zeros((len(tokens), self.block + 1), dtype=np.int64)
        for s in range(len(tokens)):
            self.counts_before[s, 1:] = np.cumsum(self.source_at == s)
        self._perms: List["OrderedDict[int, np.ndarray]"] = [OrderedDict() for _ in tokens]

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        """Source ``source``'s order of windows in ``epoch`` (the first source's, that of a run of one source)."""
        perms = self._perms[source]
        if epoch not in perms:
            key = [self.seed, epoch] + ([source] if source else [])
            perms[epoch] = np.random.default_rng(key).permutation(self.num_windows[source])
            if len(perms) > self._CACHED_EPOCHS:
                perms.popitem(last=False)
        perms.move_to_end(epoch)
        return perms[epoch]

    def draws_before(self, step: int, micro: int = 0, rank: int = 0) -> int:
        """The global draw number of the first sequence of (step, micro, rank)."""
        return ((int(step) * self.accum_steps + micro) * self.dp_world + rank) * self.micro_batch

    def windows(self, step: int, micro: int) -> Tuple[np.ndarray, np.ndarray]:
        """This rank's micro-batch ``micro`` of optimizer step ``step``: the source and the window of each
        sequence, int64 [B] each."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0; got {step!r}")
        if not 0 <= micro < self.accum_steps:
            raise ValueError(f"micro must be in 0..{self.accum_steps - 1} (accum_steps={self.accum_steps}); "
                             f"got {micro!r}")
        first = self.draws_before(step, micro, self.dp_rank)
        draws = np.arange(first, first + self.micro_batch, dtype=np.int64)
        sources = self.source_at[draws % self.block]
        # Each draw's place in its source's stream, then the epoch and slot of that stream.
        index = (draws // self.block) * self.per_block[sources] + self.index_at[draws % self.block]
        epochs, slots = index // self.num_windows[sources], index % self.num_windows[sources]
        windows = np.array([self._perm(int(s), int(e))[k] for s, e, k in zip(sources, epochs, slots)], dtype=np.int64)
        return sources, windows

    def get(self, step: int, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (inputs shifted by one token): int64 [B, T] each."""
        sources, windows = self.windows(step, micro)
        T = self.seq_len
        return _shifted([self.tokens[s].data[w * T: (w + 1) * T + 1] for s, w in zip(sources, windows)])

    def drawn(self, draws: int) -> np.ndarray:
        """How many of the first ``draws`` draws (all ranks) each source had: int64 [N]."""
        return (draws // self.block) * self.per_block + self.counts_before[:, draws % self.block]

    def seen(self, steps: int) -> Dict[str, dict]:
        """After ``steps`` optimizer steps of all ranks: per source, the tokens trained on (sequences x
        seq_len) and the epochs (passes over its windows; 1.5 = halfway through the second)."""
        counts = self.drawn(self.draws_before(steps))
        return {name: {"tokens": int(c) * self.seq_len, "epochs": float(c / n)}
                for name, c, n in zip(self.names, counts, self.num_windows)}


def validation_sets(sources: List[Source], seq_len: int, batch: int, dp_rank: int, dp_world: int,
                    max_batches: int) -> Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's validation batches of every source, by name (``data.eval_batches`` of each)."""
    sets = {}
    for source in sources:
        try:
            sets[source.name] = eval_batches(open_split(source.path, "val"), seq_len, batch, dp_rank, dp_world,
                                             max_batches)
        except ValueError as err:
            raise ValueError(f"{source.label}: {err}") from None
    return sets
