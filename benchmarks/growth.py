"""Growth: the gate's time and peak memory as tokens and experts grow, SparseMixerGate and TopKGate.

Each (gate, S, E, k) runs in a fresh process, so its peak resident memory (the growth of ru_maxrss over
one forward+backward, after the inputs exist and a tiny warm-up call) is its own. Time is the median of
a few repeats.
The gate's routing and dispatch must grow with tokens x k (and the S x E logits), never with
tokens x experts x capacity.

    python benchmarks/growth.py
    python benchmarks/growth.py --smoke
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(gate_name: str, tokens: int, experts: int, k: int, dim: int, repeats: int) -> dict:
    """Runs in the child process: time and peak-memory growth of one gate configuration."""
    import torch
    from deepspeed.moe.sharded_moe import TopKGate

    from sparsemixer_ds import SparseMixerGate
    torch.manual_seed(0)
    cls = SparseMixerGate if gate_name == "sparsemixer" else TopKGate
    gate = cls(dim, experts, k=k, capacity_factor=1.0, min_capacity=4)

    def step(x, probe):
        gate.wg.weight.grad = None
        l_aux, _, _, _, _, gates_KS, _ = gate(x, None, True)
        ((gates_KS * probe[:gates_KS.shape[0]]).sum() + l_aux).backward()

    step(torch.randn(64, dim), torch.randn(2, 64))  # one-time costs (lazy init, thread pools) at a tiny size
    x, probe = torch.randn(tokens, dim), torch.randn(2, tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(x, probe)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, probe)
        times.append(time.perf_counter() - start)
    return {"gate": gate_name, "tokens": tokens, "experts": experts, "k": k, "ms": statistics.median(times) * 1e3,
            "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/growth.json"))
    parser.add_argument("--child", nargs=4, metavar=("GATE", "S", "E", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        gate, s, e, k = args.child
        print(json.dumps(one(gate, int(s), int(e), int(k), args.dim, args.repeats)))
        return
    if args.smoke:
        args.tokens, args.experts, args.repeats = [512, 1024], [4], 2
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    rows = []
    for k in (1, 2):
        for experts in args.experts:
            for tokens in args.tokens:
                for gate in ("topk", "sparsemixer"):
                    cmd = [sys.executable, __file__, "--dim", str(args.dim), "--repeats", str(args.repeats),
                           "--child", gate, str(tokens), str(experts), str(k)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"gate forward+backward as tokens S and experts E grow (d={args.dim}, capacity factor 1.0); time: median "
          f"of {args.repeats}; memory: growth of peak RSS during the first call, fresh process per cell")
    header = f"{'k':>2} {'E':>3} {'S':>6} | {'TopKGate ms':>11} {'MB':>6} | {'SparseMixer ms':>14} {'MB':>6}"
    print(header)
    print("-" * len(header))
    cells = {(r["gate"], r["k"], r["experts"], r["tokens"]): r for r in rows}
    for k in (1, 2):
        for experts in args.experts:
            for tokens in args.tokens:
                t, s = cells[("topk", k, experts, tokens)], cells[("sparsemixer", k, experts, tokens)]
                print(f"{k:>2} {experts:>3} {tokens:>6} | {t['ms']:>11.2f} {t['peak_mb']:>6.1f} | "
                      f"{s['ms']:>14.2f} {s['peak_mb']:>6.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"dim": args.dim, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
