"""The planner's memory per rank against real runs: `sparsemixer-ds plan`'s device total (training state +
activations) beside the peak RSS of the largest process of a short `sparsemixer-ds train` on this CPU.

It also gives the runs' model FLOPs utilisation (the last logged window) against the measured CPU matmul peak.
A CPU rank's RSS holds what a GPU's memory would, plus the framework itself (Python, torch, DeepSpeed,
the gloo buffers), which the planner does not count: the table shows the peak, the framework's share
(the peak RSS of a process that only imports the trainer), the plan, and plan / (peak - framework).

    python benchmarks/plan_check.py            # configs/cpu_small.yaml and configs/cpu_phimoe.yaml, 2 ranks, 30 steps
    python benchmarks/plan_check.py --smoke    # the same two families with the tiny model, 3 steps (CI)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from sparsemixer_ds.config import load_config  # noqa: E402
from sparsemixer_ds.plan import GiB, make_plan  # noqa: E402
from sparsemixer_ds.testing import TINY, free_port, run_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Runs the command in argv and prints the largest peak RSS (bytes) among the processes it waited for.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")
FRAMEWORK = "import deepspeed, torch, transformers, sparsemixer_ds.train"


def peak_rss(cmd: list, env: dict) -> int:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--data", default="data/stdlib-bytes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/plan_check.json"))
    args = parser.parse_args()
    extra = [f"data.path={args.data}", "checkpoint.interval=0", "logging.progress=false", "logging.plot=false",
             "eval.batches=1"]
    runs = {"native": ("configs/cpu_small.yaml", []), "hf": ("configs/cpu_phimoe.yaml", [])}
    if args.smoke:
        args.steps = 3
        runs = {"native": ("configs/cpu_small.yaml", TINY),
                "hf": ("configs/cpu_phimoe.yaml", ["model.seq_len=32", "model.hf.hidden_size=32",
                                                   "model.hf.intermediate_size=32", "model.hf.num_hidden_layers=2",
                                                   "train.micro_batch=2"])}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    framework = peak_rss([sys.executable, "-c", FRAMEWORK], env)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (config, sets) in runs.items():
            sets = [f"run_dir={Path(tmp) / family}", f"train.steps={args.steps}", f"eval.interval={args.steps}",
                    f"logging.interval={args.steps}", *extra, *sets]
            plan = make_plan(load_config(REPO / config, sets), args.ranks, 80 * GiB)
            cmd = ["bash", str(REPO / "launch" / "local.sh"), "--config", str(REPO / config), "--nproc",
                   str(args.ranks), "--master-port", str(free_port()), "--"]
            cmd += [arg for item in sets for arg in ("--set", item)]
            peak = peak_rss(cmd, env)
            last = [r for r in run_metrics(Path(tmp) / family) if "mfu" in r][-1]
            rows.append({"family": family, "config": config, "ranks": args.ranks, "steps": args.steps,
                         "plan_bytes": plan.device_total, "state_bytes": plan.state.total,
                         "activation_bytes": plan.activations, "peak_rss_bytes": peak, "framework_bytes": framework,
                         "ratio": plan.device_total / peak,
                         "ratio_without_framework": plan.device_total / max(peak - framework, 1),
                         "tokens_per_s": last["tokens_per_s"], "model_tflops": last["model_tflops"],
                         "mfu": last["mfu"]})
    mib = 2**20
    print(f"planned memory per rank vs the peak RSS of the largest rank, {args.steps} steps on {args.ranks} CPU "
          f"ranks{' (smoke)' if args.smoke else ''}")
    header = (f"{'family':<7} {'config':<24} | {'plan MiB':>9} {'(state':>8} {'activ.)':>8} | {'peak RSS':>9} "
              f"{'framework':>9} | {'plan/peak':>9} {'plan/(peak-fw)':>14} | {'tokens/s':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['family']:<7} {r['config']:<24} | {r['plan_bytes'] / mib:>9.1f} {r['state_bytes'] / mib:>8.1f} "
              f"{r['activation_bytes'] / mib:>8.1f} | {r['peak_rss_bytes'] / mib:>9.1f} "
              f"{r['framework_bytes'] / mib:>9.1f} | {r['ratio']:>9.3f} {r['ratio_without_framework']:>14.3f} | "
              f"{r['tokens_per_s']:>8,.0f} {r['mfu']:>6.1%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"smoke": args.smoke, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
