"""GRIN's recipe, separated: router x balance at top-1 and top-2, with enough seeds to decide.

GRIN's headline MoE changed two things at once: the router (SparseMixer-v2 for GShard's top-2) and the balance
loss (global: routed fractions over the data-parallel group, for each rank's own). This study trains the 2 x 2 at
each k on the same model, data, batches and seeds, dropless:

    k = 1: switch+local, switch+global, sparsemixer+local, sparsemixer+global      (baseline switch+local)
    k = 2: gshard+local, gshard+global, sparsemixer-v2+local, sparsemixer-v2+global (baseline gshard+local;
           GRIN's pair is gshard+local against sparsemixer-v2+global)

Each run is the real trainer under launch/local.sh on 2 data-parallel ranks (configs/grin_study.yaml), so
``moe.balance: global`` really all-reduces the route counts over them. A finished run is one JSON file in the
output directory (its validation curve, and per logging step the MoE layers' mean max/mean expert load and router
entropy, from metrics.jsonl); an interrupted run resumes from its checkpoint; a study continues where it stopped,
in parts (--arms, --seeds) and with more seeds (--extend-to). The report (report.md, summary.json, study.png):

- per arm: final validation loss (mean, std over seeds), the paired difference to its k's baseline with a 95%
  t-interval over seeds, and the step at which its mean curve reaches the baseline's final mean loss, with a 95%
  interval from a bootstrap over seeds;
- per k: the 2 x 2 effects, each paired by seed with a 95% t-interval: router (SparseMixer - baseline router,
  averaged over the two balances), balance (global - local, averaged over the two routers) and interaction
  ((SM - base) under global minus under local), over the seeds all four arms share; and the simple effects
  (balance with each router, router with each balance), each over the seeds its two arms share, so that seeds
  an extension gave some arms count;
- study.png: validation loss, max/mean expert load and router entropy over training, per arm.

    python benchmarks/grin_study.py --seeds 0 1 2 3 4                 # all 8 arms
    python benchmarks/grin_study.py --arms switch+local sparsemixer+global --seeds 0
    python benchmarks/grin_study.py --extend-to 10                    # more seeds where an interval is undecided
    python benchmarks/grin_study.py --report-only
    python benchmarks/grin_study.py --smoke                           # 2 arms, 1 seed, 4 steps (CI)
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convergence import T95, first_reach

from sparsemixer_ds.testing import TINY

REPO = Path(__file__).resolve().parent.parent
# arm -> (top_k, router, balance); the first of each k is its baseline.
ARMS = {
    "switch+local": (1, "switch", "local"), "switch+global": (1, "switch", "global"),
    "sparsemixer+local": (1, "sparsemixer", "local"), "sparsemixer+global": (1, "sparsemixer", "global"),
    "gshard+local": (2, "gshard", "local"), "gshard+global": (2, "gshard", "global"),
    "sparsemixer-v2+local": (2, "sparsemixer-v2", "local"), "sparsemixer-v2+global": (2, "sparsemixer-v2", "global"),
}
BASELINE = {1: "switch+local", 2: "gshard+local"}
ROUTERS = {1: ("switch", "sparsemixer"), 2: ("gshard", "sparsemixer-v2")}  # (baseline router, SparseMixer's)
# A pair whose paired interval still includes zero while the point estimate is beyond this (nats) gets more seeds.
UNDECIDED = 0.005
MIN_SEEDS = 5  # the seeds every arm gets first; only then are more given where undecided
BOOTSTRAP = 2000


# ---- running ----

def run_arm(arm: str, seed: int, out: Path, config: Path, overrides: list, log) -> dict:
    """Train (arm, seed) on 2 ranks, resuming its run directory if an earlier attempt left checkpoints."""
    k, router, balance = ARMS[arm]
    run_dir = out / "runs" / f"{arm}-seed{seed}"
    settings = [f"run_dir={run_dir}", f"moe.router={router}", f"moe.top_k={k}", f"moe.balance={balance}",
                f"train.seed={seed}"] + overrides
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--config", str(config), "--"]
    cmd += [a for s in settings for a in ("--set", s)]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        cmd.append("--resume")
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt stopped before its first checkpoint: start it again
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {proc.returncode}); its run directory {run_dir} is kept, "
                         f"and the next call resumes it:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = read_run(records)
    result.update({"arm": arm, "seed": seed, "k": k, "router": router, "balance": balance,
                   "seconds": time.perf_counter() - start})
    log(f"{arm} seed {seed}: final val_loss {result['curve'][-1]['val_loss']:.4f} ({result['seconds']:.0f} s)")
    return result


def read_run(records: list) -> dict:
    """What the study keeps of a run's metrics.jsonl: the validation curve and, per logged step, the MoE layers'
    mean max/mean expert load and router entropy. A resumed run logged the steps after its checkpoint again:
    the last record of each step counts."""
    curve, load = {}, {}
    for m in records:
        if "val_loss" in m and not m.get("resumed"):
            curve[m["step"]] = {"step": m["step"], "val_loss": m["val_loss"]}
        if "layers" in m:
            layers = m["layers"]
            load[m["step"]] = {"step": m["step"], "tokens": m["tokens"],
                               "max_mean_load": statistics.fmean(layer["max_mean_load"] for layer in layers),
                               "entropy": statistics.fmean(layer["entropy"] for layer in layers)}
    return {"curve": [curve[s] for s in sorted(curve)], "load": [load[s] for s in sorted(load)],
            "tokens": max(m["tokens"] for m in load.values())}


# ---- statistics ----

def t_interval(values: list):
    """(mean, 95% half-width) over seeds, Student's t; half-width None for fewer than 2 values."""
    if len(values) < 2:
        return (statistics.fmean(values) if values else None), None
    return statistics.fmean(values), T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values)**0.5


def finals(runs: list, arm: str) -> dict:
    """seed -> final validation loss of ``arm``."""
    return {r["seed"]: r["curve"][-1]["val_loss"] for r in runs if r["arm"] == arm}


def mean_curve(runs: list) -> list:
    steps = [p["step"] for p in runs[0]["curve"]]
    return [{"step": s, "val_loss": statistics.fmean(r["curve"][i]["val_loss"] for r in runs)}
            for i, s in enumerate(steps)]


def reach_interval(arm_runs: list, base_runs: list, rng: random.Random):
    """The step at which the arm's mean curve reaches the baseline's final mean loss, and a 95% bootstrap interval
    over seeds (the seeds both have, resampled together; an end None: not reached in that share of the resamples);
    also the share of resamples that reach it at all."""
    seeds = sorted({r["seed"] for r in arm_runs} & {r["seed"] for r in base_runs})
    arm_by, base_by = {r["seed"]: r for r in arm_runs}, {r["seed"]: r for r in base_runs}
    point = first_reach(mean_curve(arm_runs), statistics.fmean(r["curve"][-1]["val_loss"] for r in base_runs))
    if len(seeds) < 2:
        return point, None, None, None
    draws = []
    for _ in range(BOOTSTRAP):
        sample = [rng.choice(seeds) for _ in seeds]
        target = statistics.fmean(base_by[s]["curve"][-1]["val_loss"] for s in sample)
        step = first_reach(mean_curve([arm_by[s] for s in sample]), target)
        draws.append(float("inf") if step is None else step)  # not reached: beyond every step
    draws.sort()
    lo, hi = (draws[round(q * (len(draws) - 1))] for q in (0.025, 0.975))
    share = sum(d != float("inf") for d in draws) / len(draws)
    return point, (None if lo == float("inf") else lo), (None if hi == float("inf") else hi), share


def paired(runs: list, arm: str, other: str) -> dict:
    """``arm`` minus ``other``, final loss paired by seed over the seeds both have: mean, 95% half-width, seeds."""
    a, b = finals(runs, arm), finals(runs, other)
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    return dict(zip(("mean", "ci95"), t_interval(diffs)), seeds=len(diffs))


def simple_effects(runs: list, k: int) -> dict:
    """Each factor at ``k`` with the other held, paired over the seeds its two arms share: this uses the seeds
    an extension gave two arms, which the 2 x 2's effects (the seeds all four arms share) cannot."""
    base, sm = ROUTERS[k]
    table = {f"balance with {router}": paired(runs, f"{router}+global", f"{router}+local") for router in (base, sm)}
    table.update({f"router with {balance} balance": paired(runs, f"{sm}+{balance}", f"{base}+{balance}")
                  for balance in ("local", "global")})
    return table


def effects(runs: list, k: int) -> dict:
    """The 2 x 2 at ``k``, paired by seed: router, balance and interaction, each (mean, 95% half-width, seeds)."""
    base, sm = ROUTERS[k]
    cells = {(router, balance): finals(runs, f"{router}+{balance}") for router in (base, sm)
             for balance in ("local", "global")}
    seeds = sorted(set.intersection(*(set(c) for c in cells.values())))
    per_seed = {"router": [], "balance": [], "interaction": []}
    for s in seeds:
        bl, bg, sl, sg = (cells[(base, "local")][s], cells[(base, "global")][s], cells[(sm, "local")][s],
                          cells[(sm, "global")][s])
        per_seed["router"].append(((sl - bl) + (sg - bg)) / 2)
        per_seed["balance"].append(((bg - bl) + (sg - sl)) / 2)
        per_seed["interaction"].append((sg - bg) - (sl - bl))
    return {name: dict(zip(("mean", "ci95"), t_interval(values)), seeds=len(values))
            for name, values in per_seed.items()}


def summarize(runs: list, seed_for_bootstrap: int = 0) -> dict:
    rng = random.Random(seed_for_bootstrap)
    arms = {}
    for arm, (k, router, balance) in ARMS.items():
        arm_runs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not arm_runs:
            continue
        values = [r["curve"][-1]["val_loss"] for r in arm_runs]
        row = {"k": k, "router": router, "balance": balance, "seeds": [r["seed"] for r in arm_runs],
               "final_mean": statistics.fmean(values), "final_std": statistics.stdev(values) if len(values) > 1 else 0.0,
               "max_mean_load": statistics.fmean(r["load"][-1]["max_mean_load"] for r in arm_runs),
               "entropy": statistics.fmean(r["load"][-1]["entropy"] for r in arm_runs)}
        base_runs = [r for r in runs if r["arm"] == BASELINE[k]]
        if arm != BASELINE[k] and base_runs:
            delta = paired(runs, arm, BASELINE[k])
            row["delta"], row["delta_ci95"], row["paired_seeds"] = delta["mean"], delta["ci95"], delta["seeds"]
            row["reach_step"], row["reach_lo"], row["reach_hi"], row["reach_share"] = reach_interval(
                arm_runs, base_runs, rng)
        arms[arm] = row
    complete = [k for k in (1, 2) if all(f"{r}+{b}" in arms for r in ROUTERS[k] for b in ("local", "global"))]
    return {"arms": arms, "effects": {k: effects(runs, k) for k in complete},
            "simple": {k: simple_effects(runs, k) for k in complete}}


def undecided(summary: dict) -> list:
    """The arms whose paired interval includes zero while the point estimate is beyond UNDECIDED nats."""
    return [arm for arm, row in summary["arms"].items()
            if row.get("delta_ci95") is not None and abs(row["delta"]) > UNDECIDED
            and abs(row["delta"]) <= row["delta_ci95"]]


# ---- reporting ----

def _pm(mean, half, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.{digits}f} ± {half:.{digits}f}" if half is not None else f"{mean:+.{digits}f}"


def report(summary: dict, runs: list) -> str:
    tokens = runs[0]["tokens"]
    lines = [f"{len(runs)} runs, {tokens:,} training tokens each; deltas and effects in nats (negative: lower "
             "loss), 95% intervals over seeds", "",
             "| arm | seeds | final loss | vs baseline | steps to baseline's final (95% bootstrap) | max/mean load | "
             "entropy |", "|---|---:|---|---|---|---:|---:|"]
    for arm, row in summary["arms"].items():
        reach = "-"
        if "reach_step" in row:
            point = f"{row['reach_step']:.0f}" if row["reach_step"] is not None else "not reached"
            lo = f"{row['reach_lo']:.0f}" if row["reach_lo"] is not None else "not reached"
            hi = f"{row['reach_hi']:.0f}" if row["reach_hi"] is not None else "not reached"
            reach = point if row["reach_share"] is None else f"{point} ({lo}-{hi})"
        lines.append(f"| {arm} | {len(row['seeds'])} | {row['final_mean']:.4f} ± {row['final_std']:.4f} | "
                     f"{_pm(row.get('delta'), row.get('delta_ci95'))} | {reach} | {row['max_mean_load']:.3f} | "
                     f"{row['entropy']:.3f} |")
    for k in summary["effects"]:
        for title, table in ((f"2 x 2 at top-{k} ({' vs '.join(ROUTERS[k])}, local vs global), paired by seed:",
                              summary["effects"][k]),
                             (f"Simple effects at top-{k} (one factor, the other held), each paired over the seeds "
                              "its two arms share:", summary["simple"][k])):
            lines += ["", title, "", "| effect | mean ± 95% | seeds |", "|---|---|---:|"]
            lines += [f"| {name} | {_pm(e['mean'], e['ci95'])} | {e['seeds']} |" for name, e in table.items()]
    return "\n".join(lines) + "\n"


def plot(runs: list, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), squeeze=False)
    for row, k in enumerate((1, 2)):
        for arm in (a for a, (ak, _, _) in ARMS.items() if ak == k):
            arm_runs = [r for r in runs if r["arm"] == arm]
            if not arm_runs:
                continue
            curve = mean_curve(arm_runs)
            axes[row][0].plot([p["step"] for p in curve], [p["val_loss"] for p in curve],
                              label=f"{arm} ({len(arm_runs)})")
            for col, key in ((1, "max_mean_load"), (2, "entropy")):
                steps = [p["step"] for p in arm_runs[0]["load"]]
                values = [statistics.fmean(r["load"][i][key] for r in arm_runs) for i in range(len(steps))]
                axes[row][col].plot(steps, values, label=arm)
        for col, title in enumerate(("validation loss", "max/mean expert load", "router entropy (nats)")):
            axes[row][col].set_title(f"top-{k}: {title}")
            axes[row][col].set_xlabel("optimizer step")
            axes[row][col].grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "grin_study.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config overrides")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--extend-to", type=int, default=0,
                        help="then give the arms with at least 5 seeds whose interval is undecided (and their "
                             "baselines) seeds up to this many")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grin_study")
    parser.add_argument("--keep-runs", action="store_true", help="keep each finished run's directory")
    parser.add_argument("--report-only", action="store_true", help="summarize the runs already in --out")
    parser.add_argument("--smoke", action="store_true", help="2 arms, 1 seed, 4 steps of the tiny model (CI)")
    args = parser.parse_args()
    overrides = list(args.set)
    if args.smoke:
        args.arms, args.seeds = ["switch+local", "sparsemixer+global"], [0]
        overrides += TINY + ["moe.moe_every=1", "train.steps=4", "train.warmup_steps=1", "eval.interval=2",
                             "eval.batches=2", "logging.interval=1", "checkpoint.interval=2"]
    args.out.mkdir(parents=True, exist_ok=True)

    def run(arms: list, seeds: list) -> None:
        for seed in seeds:
            for arm in arms:
                path = args.out / f"{arm}-seed{seed}.json"
                if path.exists():
                    continue  # finished earlier
                result = run_arm(arm, seed, args.out, args.config, overrides, print)
                path.write_text(json.dumps(result))
                if not args.keep_runs:
                    shutil.rmtree(args.out / "runs" / f"{arm}-seed{seed}")

    def load() -> list:
        return [json.loads(p.read_text()) for p in sorted(args.out.glob("*-seed*.json"))]

    if not args.report_only:
        run(args.arms, args.seeds)
        while args.extend_to:
            runs = load()
            wanted = undecided(summarize(runs))
            more = []
            for arm in wanted:
                have = {r["seed"] for r in runs if r["arm"] == arm}
                if MIN_SEEDS <= len(have) < args.extend_to:
                    more.append((arm, max(have) + 1))
            if not more:
                break
            for arm, seed in more:
                run([BASELINE[ARMS[arm][0]], arm], [seed])
    runs = load()
    if not runs:
        parser.error(f"no finished runs in {args.out}; run without --report-only first")
    summary = summarize(runs)
    text = report(summary, runs)
    print(text)
    (args.out / "report.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, args.out / "study.png")
    print(f"wrote {args.out / 'report.md'}, {args.out / 'summary.json'} and {args.out / 'study.png'}")


if __name__ == "__main__":
    main()
