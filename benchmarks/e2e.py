"""End-to-end training throughput of each router: real runs of `sparsemixer-ds train` via launch/local.sh.

For 1 and 2 ranks (ep_size = ranks), each router trains the default model (configs/cpu_small.yaml)
for a fixed number of steps; tokens/s is the median of the logged windows after the first (which
holds start-up). The routers run in turn, and the whole round repeats (A B C D A B C D ...).

    python benchmarks/e2e.py                # 4 rounds, 80 steps each
    python benchmarks/e2e.py --smoke        # 1 round, tiny model, 1 rank, 2 routers (CI)
    python benchmarks/e2e.py --ranks 1 --routers sparsemixer switch --rounds 6   # one pair, more rounds

"vs switch" divides the medians; "paired" is the median over rounds of each round's ratio to switch's
run in the same round, which cancels drifts of the machine's speed that last longer than a round.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from sparsemixer_ds.routing.registry import main_routers  # noqa: E402
from sparsemixer_ds.testing import TINY, free_port, run_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROUTERS = [(router.name, router.top_k[0]) for router in main_routers()]


def run_once(router: str, k: int, ranks: int, steps: int, extra: list, workdir: Path) -> float:
    run_dir = workdir / f"{router}-{ranks}-{len(list(workdir.iterdir()))}"
    sets = [f"run_dir={run_dir}", f"moe.router={router}", f"moe.top_k={k}", f"moe.ep_size={ranks}",
            f"train.steps={steps}", f"eval.interval={steps}", "checkpoint.interval=0", "logging.interval=10",
            "logging.progress=false", "logging.plot=false", *extra]
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", str(ranks), "--master-port", str(free_port()), "--"]
    cmd += [arg for item in sets for arg in ("--set", item)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{router} on {ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    windows = [r["tokens_per_s"] for r in run_metrics(run_dir) if "tokens_per_s" in r][1:]
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", default="data/stdlib-bytes")
    parser.add_argument("--routers", nargs="+", choices=[name for name, _ in ROUTERS], default=None,
                        help="a subset of the routers (switch, the baseline, is always run)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/e2e.json"))
    args = parser.parse_args()
    chosen = set(args.routers or [name for name, _ in ROUTERS]) | {"switch"}
    routers, extra = [(name, k) for name, k in ROUTERS if name in chosen], [f"data.path={args.data}"]
    if args.smoke:
        args.rounds, args.steps, args.ranks, routers = 1, 30, [1], ROUTERS[::2]
        extra += TINY + ["eval.batches=1"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for _ in range(args.rounds):
                for router, k in routers:
                    tok_s = run_once(router, k, ranks, args.steps, extra, Path(tmp))
                    results.setdefault(f"{ranks}", {}).setdefault(router, []).append(tok_s)
    print(f"training tokens/s, `sparsemixer-ds train` via launch/local.sh, configs/cpu_small.yaml, {args.steps} steps, "
          f"median window of each run, then median over {args.rounds} interleaved rounds")
    header = f"{'ranks':>5} {'router':<15} | {'tokens/s':>9} | {'vs switch':>9} {'paired':>7}"
    print(header)
    print("-" * len(header))
    table = []
    for ranks, by_router in results.items():
        switch = statistics.median(by_router["switch"])
        for router, values in by_router.items():
            tok_s = statistics.median(values)
            paired = statistics.median(v / base for v, base in zip(values, by_router["switch"]))
            table.append({"ranks": int(ranks), "router": router, "tokens_per_s": tok_s, "vs_switch": tok_s / switch,
                          "vs_switch_paired": paired, "runs": values})
            print(f"{ranks:>5} {router:<15} | {tok_s:>9,.0f} | {tok_s / switch:>8.2f}x {paired:>6.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "rows": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
