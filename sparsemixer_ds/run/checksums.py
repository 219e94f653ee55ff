"""Checksums that tell an intact checkpoint or export from a damaged one.

SHA-256 (hashlib): on CPUs with SHA extensions it runs at about a gigabyte per second and core, and a
checkpoint's digests are the ones ``sha256sum`` prints, so a file can be checked by hand. A flipped
bit, a truncated or a zeroed file all change it; CRC32 would be a little faster but lets
deliberately or systematically altered data through, and it is not what the tools people have use.

Digesting a checkpoint is shared: when a process group exists, among its ranks, each taking every
world-th file (a node already runs a rank per core or GPU); in a single process (check, export),
among a few threads, since hashlib releases the GIL while it hashes.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

__all__ = ["ALGORITHM", "Digest", "file_digest", "file_digests", "tensor_digest"]

ALGORITHM = "sha256"
_CHUNK = 1 << 22  # bytes read at a time
_THREADS = 4  # of a single process


class Digest(NamedTuple):
    size: int  # bytes
    sha256: str  # hex


def file_digest(path: Path) -> Optional[Digest]:
    """The size and SHA-256 of a file; None if it is missing or cannot be read."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb", buffering=0) as f:
            buffer = bytearray(_CHUNK)
            view = memoryview(buffer)
            while True:
                n = f.readinto(buffer)
                if not n:
                    break
                digest.update(view[:n])
                size += n
    except OSError:
        return None
    return Digest(size, digest.hexdigest())


def file_digests(root: Path, names: Sequence[str]) -> Dict[str, Optional[Digest]]:
    """``{name: file_digest(root / name)}``. With a process group, every rank must call it with the same
    ``names`` (largest first balances the work best): each digests its share and all get every result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(names)[rank::world]
    threads = min(_THREADS, len(mine), os.cpu_count() or 1) if world == 1 else 1
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = dict(zip(mine, pool.map(lambda name: file_digest(Path(root) / name), mine)))
    if world == 1 or not names:
        return found
    # A tensor, not an object collective: this also runs before DeepSpeed has set each rank's device.
    # Row i holds file i's size (-1: unreadable) and digest as four int64 words; other ranks' rows are 0.
    device = get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))
    table = torch.zeros(len(names), 5, dtype=torch.int64)
    for i, name in enumerate(names):
        if name in found:
            d = found[name]
            table[i, 0] = -1 if d is None else d.size
            if d is not None:
                table[i, 1:] = torch.frombuffer(bytearray.fromhex(d.sha256), dtype=torch.int64)
    table = table.to(device)
    dist.all_reduce(table)
    table = table.cpu()
    return {name: None if row[0] < 0 else Digest(int(row[0]), row[1:].numpy().tobytes().hex())
            for name, row in zip(names, table)}


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes as stored (row-major), whatever its dtype."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()
