"""What a run reports: metrics.jsonl (one JSON object per line), the same values to DeepSpeed's
monitors (CSV, TensorBoard), and the training throughput that goes with them.

Records, by the keys they carry:
    {"step", "tokens", "loss", "balance_loss", "z_loss", "lr", "skipped_steps", "tokens_per_s", "model_tflops",
     "mfu", "rss_mb", "peak_mem_mb", "layers": [{"load", "max_mean_load", "dropped", "entropy"} per MoE layer]}
                                                        every logging.interval steps
                                                        (with data.sources also "tokens_by_source": {name:
                                                        tokens} and "epochs_by_source": {name: epochs})
    {"step", "val_loss", "val_ppl"}                     every eval.interval steps and at the end (with
                                                        data.sources also "val_loss_by_source": {name: loss})
    {"step", "source", "epoch"}                         a source of data.sources ran out and wrapped around
    {"step", "resumed": true, "val_loss", "val_ppl"}    the loaded model, first thing after a resume
    {"step", "skipped_steps", "stopped": "non-finite"}  a run stopped by train.max_skipped_steps
    {"step", "stopped": "SIGTERM"}                      a run stopped on request (the signal or the reason)

``tokens_per_s`` counts all ranks; ``model_tflops`` is the model FLOP/s of one rank (flops_per_token x
tokens_per_s / ranks, sparsemixer_ds.models.flops) in TFLOP/s, and ``mfu`` that over the rank's peak (the peak
and how it was obtained are in the start's record, starts/start_NNN.yaml, as "peak_tflops" and "peak").
"""
import json
import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import psutil
import torch
from deepspeed import comm as dist

from ..routing.core import RoutingStats

__all__ = ["Metrics", "Throughput", "Utilisation", "read_metrics", "all_mean", "finite_or_none"]


def read_metrics(path: Path) -> List[dict]:
    """Every record of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def finite_or_none(value) -> Optional[float]:
    """A metric for metrics.jsonl: JSON has no NaN or infinity."""
    value = float(value)
    return value if math.isfinite(value) else None


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks of a float64 tensor."""
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def peak_memory_mb() -> float:
    """This rank's peak memory so far, in MiB: the most its tensors held on the GPU
    (``torch.cuda.max_memory_allocated``: what ``sparsemixer-ds plan`` counts, without the CUDA
    context and the allocator's cache), or on a CPU the process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    # The kernel's high-water mark (KiB on Linux) can lag the current resident set by a page table update.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak, psutil.Process().memory_info().rss) / 2**20


class Utilisation(NamedTuple):
    """What model FLOPs utilisation is measured with: the model's training FLOPs per token, a rank's
    peak FLOP/s and the number of ranks that share the tokens."""
    flops_per_token: int
    peak_flops: float  # FLOP/s of one rank
    world: int

    def of(self, tokens_per_s: float) -> Tuple[float, float]:
        """(model FLOP/s of one rank, MFU) at ``tokens_per_s`` over all ranks."""
        achieved = self.flops_per_token * tokens_per_s / self.world
        return achieved, achieved / self.peak_flops


class Metrics:
    """Writes records to ``path`` and events to DeepSpeed's ``monitor``; a no-op unless ``enabled``
    (rank 0 writes, the other ranks only take part in the all-reduces). ``utilisation`` turns tokens/s
    into model FLOP/s and MFU."""

    def __init__(self, path: Path, monitor, enabled: bool, utilisation: Utilisation) -> None:
        self.path, self.monitor, self.enabled, self.utilisation = Path(path), monitor, enabled, utilisation

    def write(self, record: dict, events: List[tuple] = ()) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor.enabled and events:
            self.monitor.write_events(events)

    def training(self, step: int, tokens: int, losses: torch.Tensor, lr: float, skipped: int, tokens_per_s: float,
                 routing: List[torch.Tensor], sources: Optional[Dict[str, dict]] = None) -> dict:
        """Log one training record. ``losses``: [ce, balance, z] means over the ranks; ``routing``: each MoE
        layer's RoutingStats sums, all-reduced; ``sources``: tokens and epochs seen per source of a
        mixture (Mixture.seen). Returns the record."""
        layers = [RoutingStats.summarize(sums) for sums in routing]
        ce, balance, z_loss = (float(v) for v in losses)
        achieved, mfu = self.utilisation.of(tokens_per_s)
        record = {"step": step, "tokens": tokens, "loss": finite_or_none(ce), "balance_loss": finite_or_none(balance),
                  "z_loss": finite_or_none(z_loss), "lr": lr, "skipped_steps": skipped, "tokens_per_s": tokens_per_s,
                  "model_tflops": achieved / 1e12, "mfu": mfu, "rss_mb": psutil.Process().memory_info().rss / 2**20,
                  "peak_mem_mb": peak_memory_mb(), "layers": layers}
        events = [("Train/loss", ce, step), ("Train/balance_loss", balance, step), ("Train/z_loss", z_loss, step),
                  ("Train/lr", lr, step), ("Train/tokens_per_s", tokens_per_s, step),
                  ("Train/model_tflops", achieved / 1e12, step), ("Train/mfu", mfu, step),
                  ("Train/skipped_steps", skipped, step)]
        if sources is not None:
            record["tokens_by_source"] = {name: seen["tokens"] for name, seen in sources.items()}
            record["epochs_by_source"] = {name: seen["epochs"] for name, seen in sources.items()}
            for name, seen in sources.items():
                events += [(f"Data/{name}/tokens", seen["tokens"], step), (f"Data/{name}/epochs", seen["epochs"], step)]
        for i, layer in enumerate(layers):
            events += [(f"MoE/layer{i}/max_mean_load", layer["max_mean_load"], step),
                       (f"MoE/layer{i}/dropped", layer["dropped"], step),
                       (f"MoE/layer{i}/entropy", layer["entropy"], step)]
            events += [(f"MoE/layer{i}/load_expert{e}", v, step) for e, v in enumerate(layer["load"])]
        self.write(record, events)
        return record

    def evaluation(self, step: int, result: dict) -> None:
        events = [("Eval/loss", result["val_loss"], step), ("Eval/ppl", result["val_ppl"], step)]
        events += [(f"Eval/loss/{name}", loss, step) for name, loss in result.get("val_loss_by_source", {}).items()]
        self.write({"step": step, **result}, events)


class Throughput:
    """Training tokens per second over the steps since the last reading, without the time spent
    ``paused()`` (evaluation and checkpoints)."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self._start, self._steps = time.perf_counter(), 0

    def step(self) -> None:
        self._steps += 1

    def read(self) -> float:
        """Tokens/s since the last read; starts a new window."""
        now = time.perf_counter()
        rate = self.tokens_per_step * self._steps / (now - self._start)
        self._start, self._steps = now, 0
        return rate

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - began
