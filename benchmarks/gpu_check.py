"""The GPU check: one run of everything issue 13 measures on a GPU, in about 10 minutes on one H200.

1. the gate: TopKGate, SparseMixerGate eager and fused, and the floor (benchmarks/gate.py's table), and the
   routing function alone by size (gate.py --sizes);
2. bf16 training steps of the shipped GPU configs scaled to one GPU, through launch/local.sh: tokens/s and
   MFU from metrics.jsonl, peak GPU memory (max_memory_allocated) against ``sparsemixer-ds plan``'s figure;
   configs/gpu_single.yaml as it is, with activation checkpointing and compiled, and configs/gpu_grin.yaml
   (PhiMoE under AutoEP, ZeRO-3, grouped GEMM) cut to 2 layers and ep_size 1;
3. a table of all of it, and the same as JSON and as Markdown for docs/RESULTS.md.

Run it through benchmarks/gpu_check.sh, which installs what is missing first. ``--smoke`` runs the same
steps on the CPU at the CPU configs' size (the test suite's check that the script works).

    benchmarks/gpu_check.sh                     # on a GPU machine
    python benchmarks/gpu_check.py --smoke      # on a CPU, a minute or two
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gate  # noqa: E402  benchmarks/gate.py

from sparsemixer_ds.config import load_config  # noqa: E402
from sparsemixer_ds.models.flops import measure_peak  # noqa: E402
from sparsemixer_ds.run.metrics import read_metrics  # noqa: E402
from sparsemixer_ds.plan import GiB, make_plan  # noqa: E402


class TrainingRun(NamedTuple):
    name: str
    config: str
    overrides: List[str]
    steps: int


# The shipped GPU configs on one GPU. The data are the stdlib sources as bytes: the models keep their
# 32000-entry vocabularies (the LM head's FLOPs count), the bytes use 256 of them.
GPU_RUNS = [
    TrainingRun("gpu_single", "configs/gpu_single.yaml", [], 60),
    TrainingRun("gpu_single + activation checkpointing", "configs/gpu_single.yaml",
                ["train.activation_checkpointing=true"], 40),
    TrainingRun("gpu_single + compile", "configs/gpu_single.yaml", ["train.compile=true"], 40),
    TrainingRun("gpu_grin, 2 layers, ep_size 1", "configs/gpu_grin.yaml",
                ["model.hf.num_hidden_layers=2", "moe.ep_size=1", "train.grad_accum=4"], 20),
]
# --smoke: the same steps at the CPU configs' size, fp32.
SMOKE_RUNS = [
    TrainingRun("cpu_small", "configs/cpu_small.yaml", ["train.micro_batch=2", "model.seq_len=64", "moe.ep_size=1"], 4),
    TrainingRun("cpu_small + activation checkpointing", "configs/cpu_small.yaml",
                ["train.micro_batch=2", "model.seq_len=64", "moe.ep_size=1", "train.activation_checkpointing=true"], 4),
    TrainingRun("cpu_phimoe, ep_size 1", "configs/cpu_phimoe.yaml",
                ["train.micro_batch=2", "model.seq_len=64", "moe.ep_size=1"], 4),
]


def check_gate(device: torch.device, smoke: bool) -> dict:
    shapes, repeats = (gate.SMOKE_SHAPES, 3) if smoke else (gate.SHAPES, 30)
    rows = [row for shape in shapes for row in gate.bench_shape(*shape, repeats, device)]
    sizes = gate.bench_sizes(gate.SIZES[:1] if smoke else gate.SIZES, 3 if smoke else 30, device)
    return {"repeats": repeats, "rows": rows, "sizes": sizes}


def prepare_data(out: Path, smoke: bool) -> Path:
    """The stdlib sources as bytes (the default corpus; --smoke: one package of it)."""
    data = out / "data"
    if not (data / "meta.json").exists():
        cmd = [sys.executable, "-m", "sparsemixer_ds.cli", "prepare", "--out", str(data), "--quiet"]
        if smoke:
            cmd.insert(-3, str(Path(json.__file__).parent))
        subprocess.run(cmd, cwd=REPO, check=True)
    return data


def train(run: TrainingRun, data: Path, out: Path, port: int, device_memory: int, timeout: int) -> dict:
    """One training run on one GPU (or CPU rank): its throughput, MFU and peak memory against the plan."""
    run_dir = out / "runs" / run.name.split(",")[0].replace(" + ", "_").replace(" ", "_")
    overrides = [f"run_dir={run_dir}", f"data.path={data}", f"train.steps={run.steps}", "train.tokens=0",
                 f"eval.interval={run.steps}", "eval.batches=2", "checkpoint.interval=0", "checkpoint.keep=1",
                 f"logging.interval={max(run.steps // 6, 1)}", "logging.plot=false", "logging.progress=false",
                 *run.overrides]
    args = [arg for item in overrides for arg in ("--set", item)]
    cmd = ["bash", "launch/local.sh", "--config", run.config, "--nproc", "1", "--master-port", str(port), "--", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"name": run.name, "error": (proc.stdout[-2000:] + proc.stderr[-3000:]).strip(), "wall_s": wall}
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    timed = records[1:] or records  # the first window holds the warm-up (and compilation)
    plan = make_plan(load_config(Path(run.config), overrides), 1, device_memory)
    peak_mem = max(r["peak_mem_mb"] for r in records) * 2**20
    return {"name": run.name, "config": run.config, "overrides": run.overrides, "steps": run.steps, "wall_s": wall,
            "run_dir": str(run_dir),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "model_tflops": statistics.median(r["model_tflops"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed), "loss": records[-1]["loss"],
            "peak_mem_bytes": peak_mem, "plan_bytes": plan.device_total, "plan_over_peak": plan.device_total / peak_mem,
            "params": plan.cost.total, "active": plan.cost.active, "flops_per_token": plan.cost.flops_per_token}


def report(result: dict) -> str:
    """The results as Markdown tables (what docs/RESULTS.md takes)."""
    env = result["env"]
    lines = [f"Device: {env['device']}; torch {env['torch']}, DeepSpeed {env['deepspeed']}; measured peak "
             f"{env['peak_tflops']:.3g} TFLOP/s ({env['peak_source']}).", "",
             "| S | d | E | k | TopKGate ms | eager ms | fused ms | floor ms | fused/TopK | fused/floor | fused/eager |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["gate"]["rows"]:
        lines.append(f"| {r['tokens']} | {r['dim']} | {r['experts']} | {r['k']} | {r['topk_ms']:.3f} | "
                     f"{r['sparsemixer_ms']:.3f} | {r['fused_ms']:.3f} | {r['floor_ms']:.3f} | "
                     f"{r['fused_vs_topk']:.2f}x | {r['fused_vs_floor']:.2f}x | {r['fused_vs_eager']:.2f}x |")
    lines += ["", "| S | E | k | eager ms | fused ms | fused/eager |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["gate"]["sizes"]:
        lines.append(f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['eager_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['fused_vs_eager']:.2f}x |")
    lines += ["", "| run | parameters (active) | tokens/s | TFLOP/s | MFU | peak memory | plan | plan/peak |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: see gpu_check.json | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['params'] / 1e6:,.0f}M ({r['active'] / 1e6:,.0f}M) | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} | {r['mfu']:.1%} | "
                     f"{r['peak_mem_bytes'] / GiB:.2f} GiB | {r['plan_bytes'] / GiB:.2f} GiB | "
                     f"{r['plan_over_peak']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU at the CPU configs' size")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--port", type=int, default=29533, help="rendezvous port of the training runs")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible to torch; run it on a GPU machine, or --smoke on a CPU")
    device = torch.device("cuda" if not args.smoke else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    import deepspeed
    peak = measure_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    device_memory = (torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 80 * GiB)
    result = {"env": {"device": name, "host": socket.gethostname(), "torch": torch.__version__,
                      "deepspeed": deepspeed.__version__, "peak_tflops": peak.flops / 1e12, "peak_source": peak.source,
                      "device_memory": device_memory}}
    started = time.perf_counter()
    result["gate"] = check_gate(device, args.smoke)
    print(f"gpu_check: gate done in {time.perf_counter() - started:.0f} s", flush=True)
    data = prepare_data(args.out, args.smoke)
    result["training"] = []
    for i, run in enumerate(SMOKE_RUNS if args.smoke else GPU_RUNS):
        result["training"].append(train(run, data, args.out, args.port + i, device_memory, timeout=240))
        print(f"gpu_check: {run.name} done at {time.perf_counter() - started:.0f} s", flush=True)
    table = report(result)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    failed = [r["name"] for r in result["training"] if "error" in r]
    for r in result["training"]:
        if "error" in r:
            print(f"gpu_check: {r['name']} failed:\n{r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
