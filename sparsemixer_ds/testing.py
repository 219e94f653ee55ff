"""Helpers shared by the tests and the benchmarks: one place instead of scripts importing each other.

- ``TINY``: run-config overrides for a model small enough to train in seconds on a CPU;
- ``free_port()``: a TCP port nothing listens on, for a job's rendezvous;
- ``run_metrics(run_dir)``: the records of a run's metrics.jsonl;
- ``time_interleaved(steps, repeats, device)``: median seconds per call of several functions run in turn.
The expert MLP of tests and benchmarks is the model's own, ``sparsemixer_ds.models.native.feed_forward``.
"""
import socket
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .run.metrics import read_metrics
from .run.rundir import RunDir

__all__ = ["TINY", "free_port", "run_metrics", "interleaved_samples", "time_interleaved", "sync"]

# The model shape and batch of a tiny run: 2 blocks of width 32, 4 experts per MoE layer, 32-token windows.
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=4", "moe.expert_hidden=32", "train.micro_batch=4", "eval.batch_size=4"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_metrics(run_dir: Path) -> List[dict]:
    return read_metrics(RunDir(run_dir).metrics)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(steps: Dict[str, Callable[[], None]], repeats: int,
                        device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each call of each step, run in turn (A B C A B C ...) so drifts hit all of them alike;
    repeat i of every step is one pair (or tuple) for paired ratios."""
    for step in steps.values():  # warm-up: allocator, lazy init, caches
        for _ in range(3):
            step()
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each step, run interleaved (``interleaved_samples``)."""
    samples = interleaved_samples(steps, repeats, device)
    return {name: statistics.median(values) for name, values in samples.items()}
