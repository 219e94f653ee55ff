"""Convergence study: routers side by side, equal tokens, steps and seeds, on one process.

Every arm trains the same model (a run config, `--set` overrides) on the same batches with the
same seeds; only `moe.router` (and `moe.top_k`) changes. Each (arm, seed) run is one JSON file in
the output directory, written when it finishes, so an interrupted study continues where it stopped
and a study can grow by more seeds. The report: validation-loss curves (mean and band over seeds),
final loss per arm (mean +- std), the step where each arm first reaches the baseline's final mean
loss (speed-up = baseline steps / arm steps), and where the mean curves cross the baseline's.

    python benchmarks/convergence.py --config configs/convergence_small.yaml --seeds 0 1 2
    python benchmarks/convergence.py --config configs/convergence_small.yaml --top-k 2 \\
        --arms gshard sparsemixer-v2 --baseline gshard --out benchmarks/results/convergence-top2
    python benchmarks/convergence.py --smoke      # two arms, one seed, a few steps (CI)
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from sparsemixer_ds.config import load_config, total_steps  # noqa: E402
from sparsemixer_ds.data.loader import eval_batches
from sparsemixer_ds.data.prepared import model_vocab_size, open_split  # noqa: E402
from sparsemixer_ds.data.loader import Mixture  # noqa: E402
from sparsemixer_ds.models.families import get_family  # noqa: E402
from sparsemixer_ds.run.optim import build_optimizer  # noqa: E402
from sparsemixer_ds.routing.registry import ROUTERS  # noqa: E402
from sparsemixer_ds.testing import TINY  # noqa: E402
from sparsemixer_ds.train import evaluate, step_seed  # noqa: E402

TOP1_ARMS = [name for name, router in ROUTERS.items() if 1 in router.top_k]
# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables); 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_delta(arm_runs: list, base_runs: list):
    """Mean final-loss difference arm - baseline over the seeds both have, with its 95% half-width."""
    base = {r["seed"]: r["curve"][-1]["val_loss"] for r in base_runs}
    diffs = [r["curve"][-1]["val_loss"] - base[r["seed"]] for r in arm_runs if r["seed"] in base]
    if len(diffs) < 2:
        return None, None
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs)**0.5
    return statistics.fmean(diffs), half


def train_arm(cfg, arm: str, seed: int, val_batches: int, device: torch.device, log) -> dict:
    """One run: the validation-loss curve of ``arm`` with ``seed``."""
    cfg.moe.router, cfg.train.seed = arm, seed
    data_dir = Path(cfg.data.path)
    cfg.model.vocab_size = model_vocab_size(data_dir, cfg.model.vocab_size)
    t = cfg.train
    steps = total_steps(cfg, 1)
    batches = Mixture([open_split(data_dir, "train")], [1.0], cfg.model.seq_len, t.micro_batch, 0, 1, t.grad_accum, seed)
    # The same validation windows for every arm and seed.
    val = eval_batches(open_split(data_dir, "val"), cfg.model.seq_len, cfg.eval.batch_size, 0, 1, val_batches)
    torch.manual_seed(seed)
    model = get_family(cfg).build(cfg).to(device)
    optimizer, schedule = build_optimizer(model, cfg, steps, guarded=False)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        for micro in range(t.grad_accum):
            x, y = batches.get(step, micro)
            torch.manual_seed(step_seed(seed, step, micro, 0))
            (model(x.to(device), y.to(device)).loss / t.grad_accum).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % cfg.eval.interval == 0 or step + 1 == steps:
            val_loss = evaluate(model, val, seed, step + 1, 0, device)["val_loss"]
            curve.append({"step": step + 1, "val_loss": val_loss})
            log(f"{arm} seed {seed} step {step + 1}: val_loss {val_loss:.4f} ({time.perf_counter() - start:.0f} s)")
    tokens = steps * t.micro_batch * t.grad_accum * cfg.model.seq_len
    return {"arm": arm, "seed": seed, "steps": steps, "tokens": tokens, "seconds": time.perf_counter() - start,
            "val_tokens": len(val) * cfg.eval.batch_size * cfg.model.seq_len, "curve": curve}


def first_reach(curve: list, target: float):
    """The first step whose validation loss is <= target, interpolated between evaluations."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return point["step"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev["step"] + frac * (point["step"] - prev["step"])
        prev = point
    return None


def summarize(runs: list, baseline: str) -> dict:
    """Per arm: the mean curve, final loss mean and std, steps to the baseline's final loss, crossings."""
    by_arm = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    means = {}
    for arm, arm_runs in by_arm.items():
        steps = [p["step"] for p in arm_runs[0]["curve"]]
        means[arm] = [{"step": s, "val_loss": statistics.fmean(r["curve"][i]["val_loss"] for r in arm_runs)}
                      for i, s in enumerate(steps)]
    summary = {}
    base_final = means[baseline][-1]["val_loss"] if baseline in means else None
    for arm, arm_runs in by_arm.items():
        finals = [r["curve"][-1]["val_loss"] for r in arm_runs]
        reach = first_reach(means[arm], base_final) if base_final is not None else None
        base_steps = means[baseline][-1]["step"] if base_final is not None else None
        crossings = []
        if arm != baseline and baseline in means:
            diff = [a["val_loss"] - b["val_loss"] for a, b in zip(means[arm], means[baseline])]
            crossings = [means[arm][i]["step"] for i in range(1, len(diff)) if (diff[i - 1] > 0) != (diff[i] > 0)]
        delta, half = paired_delta(arm_runs, by_arm.get(baseline, []))
        summary[arm] = {
            "seeds": len(arm_runs),
            "delta_vs_baseline": delta,
            "delta_ci95": half,
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "steps_to_baseline_final": reach,
            "speedup": (base_steps / reach) if reach else None,
            "crossings": crossings,
            "mean_curve": means[arm],
        }
    return summary


def plot(runs: list, summary: dict, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, row in summary.items():
        arm_runs = [r for r in runs if r["arm"] == arm]
        steps = [p["step"] for p in row["mean_curve"]]
        mean = [p["val_loss"] for p in row["mean_curve"]]
        lo = [min(r["curve"][i]["val_loss"] for r in arm_runs) for i in range(len(steps))]
        hi = [max(r["curve"][i]["val_loss"] for r in arm_runs) for i in range(len(steps))]
        ax.plot(steps, mean, label=f"{arm} ({row['seeds']} seeds)")
        ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("validation loss: mean over seeds, band = min..max")
    tail = [p["val_loss"] for row in summary.values() for p in row["mean_curve"][len(row["mean_curve"]) // 3:]]
    if tail:
        ax.set_ylim(min(tail) - 0.02, max(tail) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/convergence_small.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--arms", nargs="+", default=TOP1_ARMS)
    parser.add_argument("--baseline", default="switch")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-batches", type=int, default=64, help="fixed validation batches of eval.batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence"))
    parser.add_argument("--report-only", action="store_true", help="summarize the runs already in --out")
    parser.add_argument("--smoke", action="store_true", help="switch vs sparsemixer, one seed, 6 steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.set) + [f"moe.top_k={args.top_k}", "moe.ep_size=1"]
    if args.smoke:
        args.arms, args.seeds, args.val_batches = ["switch", "sparsemixer"], [0], 2
        overrides += TINY + ["train.steps=6", "eval.interval=3"]
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if not args.report_only:
        for seed in args.seeds:
            for arm in args.arms:
                path = args.out / f"{arm}-seed{seed}.json"
                if path.exists():
                    continue  # finished earlier
                cfg = load_config(args.config, overrides + [f"moe.router={arm}"])
                run = train_arm(cfg, arm, seed, args.val_batches, device, print)
                path.write_text(json.dumps(run))
    runs = [json.loads(p.read_text()) for p in sorted(args.out.glob("*-seed*.json"))]
    runs = [r for r in runs if r["arm"] in args.arms]
    if not runs:
        parser.error(f"no finished runs of {', '.join(args.arms)} in {args.out}; run without --report-only first")
    summary = summarize(runs, args.baseline)
    print(f"\nfinal validation loss, baseline {args.baseline}; {runs[0]['tokens']:,} training tokens per run, "
          f"{runs[0]['val_tokens']:,} validation tokens")
    header = (f"{'arm':<16} {'seeds':>5} | {'final loss':>17} | {'vs baseline (95% CI)':>21} | "
              f"{'steps to baseline final':>23} {'speed-up':>8} | crossings")
    print(header)
    print("-" * len(header))
    for arm, row in sorted(summary.items(), key=lambda kv: kv[1]["final_mean"]):
        reach = f"{row['steps_to_baseline_final']:.0f}" if row["steps_to_baseline_final"] else "not reached"
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        delta = (f"{row['delta_vs_baseline']:+.4f} +- {row['delta_ci95']:.4f}" if row["delta_vs_baseline"] is not None
                 else "-")
        print(f"{arm:<16} {row['seeds']:>5} | {row['final_mean']:.4f} +- {row['final_std']:.4f} | {delta:>21} | "
              f"{reach:>23} {speed:>8} | {row['crossings']}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(runs, summary, args.out / "curves.png")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
