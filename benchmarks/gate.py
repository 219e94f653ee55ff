"""Gate overhead: SparseMixerGate vs DeepSpeed's TopKGate, forward + backward on identical inputs.

SparseMixerGate runs twice, with the estimator eager and fused (sparsemixer_ds.routing.estimator: compiled by
inductor). Also times the floor: the router's linear and one softmax, forward and backward. Runs
are interleaved (A B A B ...) and each cell is a median. Prints a table; writes JSON.

    python benchmarks/gate.py                  # the README's table
    python benchmarks/gate.py --smoke          # a tiny shape, a few repeats (CI)
    python benchmarks/gate.py --profile 16384,256,8,2   # where SparseMixerGate's time goes (S,d,E,k)
    python benchmarks/gate.py --sizes          # the routing function alone, eager vs fused, by size:
                                               # where "auto" starts to pick fused on this device
"""
import argparse
import json
import os
import platform
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402

from sparsemixer_ds import SparseMixerGate, sparsemixer  # noqa: E402
from sparsemixer_ds.testing import sync, time_interleaved  # noqa: E402

SHAPES = [  # (tokens S, model dim d, experts E)
    (16384, 256, 8),  # few experts: short softmax rows, where a CPU softmax is slowest per element
    (65536, 256, 8),
    (16384, 512, 16),
    (16384, 64, 64),  # router-dominated: the linear is cheap, per-expert bookkeeping is not
]
SMOKE_SHAPES = [(512, 32, 8)]
GATE_OPTIONS = dict(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4)


def make_step(gate: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor):
    """One forward + backward through the gate's sparse routes, as DeepSpeed's MOELayer calls it."""

    def step():
        gate.wg.weight.grad = None
        l_aux, _, _, _, _, gates_KS, _ = gate(x, None, True)
        ((gates_KS * probe[:gates_KS.shape[0]]).sum() + l_aux).backward()

    return step


def make_floor(gate: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor):
    """The least any router does: logits = x W^T and one softmax, forward and backward."""

    def step():
        gate.wg.weight.grad = None
        probs = torch.softmax(torch.nn.functional.linear(x, gate.wg.weight), dim=1)
        (probs[:, 0] * probe[0]).sum().backward()

    return step


def bench_shape(tokens: int, dim: int, experts: int, repeats: int, device: torch.device) -> list:
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=device)
    probe = torch.randn(2, tokens, device=device)
    rows = []
    for k in (1, 2):
        common = dict(k=k, **GATE_OPTIONS)
        topk = TopKGate(dim, experts, **common).to(device)
        mixer = SparseMixerGate(dim, experts, routing_impl="eager", **common).to(device)
        fused = SparseMixerGate(dim, experts, routing_impl="fused", **common).to(device)
        mixer.wg.weight.data.copy_(topk.wg.weight.data)
        fused.wg.weight.data.copy_(topk.wg.weight.data)
        steps = {"topk": make_step(topk, x, probe), "sparsemixer": make_step(mixer, x, probe),
                 "fused": make_step(fused, x, probe), "floor": make_floor(mixer, x, probe)}
        for _ in range(3):  # compile (or load from inductor's cache) before timing
            steps["fused"]()
        times = time_interleaved(steps, repeats, device)
        rows.append({
            "tokens": tokens, "dim": dim, "experts": experts, "k": k,
            "topk_ms": times["topk"] * 1e3, "sparsemixer_ms": times["sparsemixer"] * 1e3,
            "fused_ms": times["fused"] * 1e3, "floor_ms": times["floor"] * 1e3,
            "vs_topk": times["sparsemixer"] / times["topk"], "vs_floor": times["sparsemixer"] / times["floor"],
            "fused_vs_topk": times["fused"] / times["topk"], "fused_vs_floor": times["fused"] / times["floor"],
            "fused_vs_eager": times["fused"] / times["sparsemixer"],
        })
    return rows


SIZES = [(256, 8), (512, 8), (1024, 8), (4096, 8), (8192, 8), (16384, 8), (65536, 8), (1024, 64), (4096, 64), (16384, 64)]


def bench_sizes(sizes: list, repeats: int, device: torch.device) -> list:
    """The routing function alone (sparsemixer_ds.routing.estimator.sparsemixer), forward + backward, eager vs fused."""
    rows = []
    for tokens, experts in sizes:
        for k in (1, 2):
            logits = torch.randn(tokens, experts, device=device, requires_grad=True)
            probe = torch.randn(tokens, k, device=device)

            def step(impl):
                def run():
                    logits.grad = None
                    (sparsemixer(logits, top_k=k, impl=impl)[1] * probe).sum().backward()
                return run

            for _ in range(3):
                step("fused")()
            times = time_interleaved({"eager": step("eager"), "fused": step("fused")}, repeats, device)
            rows.append({"tokens": tokens, "experts": experts, "k": k, "logits": tokens * experts,
                         "eager_ms": times["eager"] * 1e3, "fused_ms": times["fused"] * 1e3,
                         "fused_vs_eager": times["fused"] / times["eager"]})
    return rows


def print_sizes(rows: list) -> None:
    header = f"{'S':>6} {'E':>3} {'k':>2} {'S x E':>8} | {'eager ms':>9} {'fused ms':>9} | {'fused/eager':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['tokens']:>6} {r['experts']:>3} {r['k']:>2} {r['logits']:>8} | {r['eager_ms']:>9.3f} "
              f"{r['fused_ms']:>9.3f} | {r['fused_vs_eager']:>10.2f}x")


def profile_shape(shape: str, device: torch.device) -> None:
    """Print torch.profiler's table for SparseMixerGate forward + backward at one "S,d,E,k" shape."""
    try:
        tokens, dim, experts, k = (int(v) for v in shape.split(","))
    except ValueError:
        raise SystemExit(f"--profile takes S,d,E,k as four integers, e.g. 16384,256,8,2; got {shape!r}")
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=device)
    probe = torch.randn(2, tokens, device=device)
    gate = SparseMixerGate(dim, experts, k=k, **GATE_OPTIONS).to(device)
    step = make_step(gate, x, probe)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(20):
            step()
        sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"SparseMixerGate forward+backward, S={tokens} d={dim} E={experts} k={k}, 20 steps, {device}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, 3 repeats: checks the script runs")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gate.json"))
    parser.add_argument("--profile", metavar="S,d,E,k", help="print the profile of one shape instead of the table")
    parser.add_argument("--sizes", action="store_true", help="the routing function alone, eager vs fused, by size")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile:
        profile_shape(args.profile, device)
        return
    if args.sizes:
        sizes, repeats = (SIZES[:1], 3) if args.smoke else (SIZES, args.repeats)
        rows = bench_sizes(sizes, repeats, device)
        print(f"routing function forward+backward, median of {repeats} interleaved runs, {device} "
              f"({torch.get_num_threads()} threads), torch {torch.__version__}")
        print_sizes(rows)
        path = args.json.with_name("gate_sizes.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        print(f"wrote {path}")
        return
    shapes, repeats = (SMOKE_SHAPES, 3) if args.smoke else (SHAPES, args.repeats)

    rows = [row for shape in shapes for row in bench_shape(*shape, repeats, device)]
    header = f"{'S':>6} {'d':>4} {'E':>3} {'k':>2} | {'TopKGate ms':>11} {'eager ms':>9} {'fused ms':>9} " \
             f"{'floor ms':>9} | {'eager/TopK':>10} {'eager/floor':>11} | {'fused/TopK':>10} {'fused/floor':>11} " \
             f"{'fused/eager':>11}"
    print(f"gate forward+backward, median of {repeats} interleaved runs, {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['tokens']:>6} {r['dim']:>4} {r['experts']:>3} {r['k']:>2} | {r['topk_ms']:>11.2f} "
              f"{r['sparsemixer_ms']:>9.2f} {r['fused_ms']:>9.2f} {r['floor_ms']:>9.2f} | {r['vs_topk']:>9.2f}x "
              f"{r['vs_floor']:>10.2f}x | {r['fused_vs_topk']:>9.2f}x {r['fused_vs_floor']:>10.2f}x "
              f"{r['fused_vs_eager']:>10.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "repeats": repeats}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
