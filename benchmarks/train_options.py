"""What ``train.compile`` and ``train.activation_checkpointing`` cost and save: step time and peak memory of
one training step (forward, backward, optimizer) per option, for a native and a Hugging Face model.

Each (model, option) runs in a fresh process on one rank (a world of one, ``moe.ep_size=1``; the configs' other
settings as they are, the DeepSpeed JSON they name, the trainer's AdamW), on random tokens of the configs'
sequence length. The process builds the DeepSpeed engine as the trainer does (``engine.compile()`` for
``compile``), runs ``--warmup`` steps (the compile happens there), then times ``--steps`` steps. Rounds of
processes run interleaved (baseline, compile, checkpointing, baseline, ...), so a drift of the machine hits
every option alike; the table gives the median step over all rounds.

Memory, per process (Linux RSS, MiB):
- ``base``: RSS just before the model is built (Python, torch, DeepSpeed, the process group);
- ``peak``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water mark of the whole process at its end
  (for ``compile`` it includes inductor's own compile-time memory);
- ``steps_peak``: the largest RSS a thread sampled every millisecond during the timed steps (after any
  compile): the memory training holds, activations included, minus nothing;
- ``steps_growth``: ``steps_peak - base``: the model, its optimizer state, gradients and activations.

    python benchmarks/train_options.py                 # cpu_small (native) and cpu_phimoe (hf), micro-batch 32
    python benchmarks/train_options.py --smoke         # tiny models, one round (CI)
    python benchmarks/train_options.py --graph-breaks  # torch.compile's graph breaks in the native model
                                                      # (cpu_small's shape; with --smoke the tiny one)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sparsemixer_ds.testing import TINY, free_port  # noqa: E402

OPTIONS = {"baseline": [], "compile": ["train.compile=true"],
           "activation_checkpointing": ["train.activation_checkpointing=true"]}
CONFIGS = {"native": REPO / "configs" / "cpu_small.yaml", "hf": REPO / "configs" / "cpu_phimoe.yaml"}
# The smoke size: the tiny model of the tests; for hf a PhiMoE of the same width.
SMOKE = {"native": TINY,
         "hf": ['model.hf={"model_type": "phimoe", "hidden_size": 32, "intermediate_size": 32, '
                '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
                '"num_local_experts": 4, "num_experts_per_tok": 2}', "model.seq_len=32", "train.micro_batch=4"]}
VOCAB = 257  # the byte tokenizer's


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_config(family: str, overrides: list):
    from sparsemixer_ds.config import load_config
    return load_config(CONFIGS[family], [f"model.vocab_size={VOCAB}", "moe.ep_size=1", *overrides])


def world_of_one() -> None:
    from sparsemixer_ds.run.comm import init_distributed
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    init_distributed(verbose=False)


def engine_for(cfg):
    """The trainer's engine for ``cfg``: its model, DS JSON, AdamW, and engine.compile() with train.compile."""
    import deepspeed
    from sparsemixer_ds.config import load_ds_config
    from sparsemixer_ds.models.families import get_family
    from sparsemixer_ds.run.optim import make_adamw
    family = get_family(cfg)
    ds = load_ds_config(REPO / cfg.ds_config, cfg, 1)
    ds.pop("csv_monitor", None)  # no monitor files from a benchmark
    ds.update(family.ds_config(cfg, ds, cfg.ds_config))
    torch.manual_seed(0)
    model = family.build(cfg)
    engine, *_ = deepspeed.initialize(model=model, config=ds, optimizer=lambda _p: make_adamw(model, cfg, False))
    if cfg.train.compile:
        engine.compile()
    return engine


def worker(family: str, option: str, overrides: list, warmup: int, steps: int) -> dict:
    """One process's measurement (see the module docstring), as a dict."""
    world_of_one()
    cfg = run_config(family, overrides + OPTIONS[option])
    base = rss_mib()
    engine = engine_for(cfg)
    tokens = torch.randint(0, VOCAB, (cfg.train.micro_batch, cfg.model.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))

    def step():
        out = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(out.loss)
        engine.step()
        return float(out.loss)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - start
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    return {"family": family, "option": option, "step_s": times, "warmup_s": warmup_s, "losses": losses,
            "base_mib": base, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps_peak_mib": peak[0], "micro_batch": cfg.train.micro_batch, "seq_len": cfg.model.seq_len}


def spawn(family: str, option: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", family, option, "--warmup", str(args.warmup), "--steps",
           str(args.steps), "--micro-batch", str(args.micro_batch)] + (["--smoke"] if args.smoke else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list) -> str:
    lines = [f"{'model':7} {'option':25} {'ms/step':>9} {'vs base':>8} {'warmup s':>9} {'base MiB':>9} "
             f"{'peak MiB':>9} {'steps peak':>11} {'steps growth':>13}"]
    for r in rows:
        lines.append(f"{r['family']:7} {r['option']:25} {r['ms']:9.1f} {r['vs_baseline']:7.2f}x {r['warmup_s']:9.1f} "
                     f"{r['base_mib']:9.0f} {r['peak_mib']:9.0f} {r['steps_peak_mib']:11.0f} "
                     f"{r['steps_growth_mib']:13.0f}")
    return "\n".join(lines)


def graph_breaks(overrides: list) -> list:
    """torch._dynamo.explain of one training forward (with targets) of the native model at cpu_small's shape:
    the counts, then each break's reason and where (the two innermost frames of the user stack). The hf
    family is not explained whole: it compiles per decoder layer with the AutoEP layer left eager
    (compile.autoep_non_moe), because on the CPU torch._grouped_mm's fake kernel refuses float32."""
    from sparsemixer_ds.models.families import get_family
    cfg = run_config("native", overrides)
    torch.manual_seed(0)
    model = get_family(cfg).build(cfg)
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(tokens[:, :-1], tokens[:, 1:])
    report = []
    for item in explained.break_reasons:
        where = [f"{f.filename.split('site-packages/')[-1].replace(str(REPO) + '/', '')}:{f.lineno} "
                 f"{(f.line or '').strip()}" for f in item.user_stack[-2:]]
        report.append({"reason": item.reason.strip().splitlines()[0], "where": where})
    return [{"graphs": explained.graph_count, "breaks": explained.graph_break_count}] + report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round, few steps")
    parser.add_argument("--graph-breaks", action="store_true", help="print torch.compile's graph breaks and exit")
    parser.add_argument("--families", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "train_options.json")
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "OPTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.warmup, args.steps = 1, 2, 3

    def overrides(family: str) -> list:
        return SMOKE[family] if args.smoke else [f"train.micro_batch={args.micro_batch}"]

    if args.worker:
        family, option = args.worker
        print(json.dumps(worker(family, option, overrides(family), args.warmup, args.steps)))
        return
    if args.graph_breaks:
        counts, *breaks = graph_breaks(overrides("native"))
        print(f"native ({CONFIGS['native'].name}, training forward): {counts['graphs']} graphs, "
              f"{counts['breaks']} graph breaks")
        for item in breaks:
            print(f"  - {item['reason']}")
            for frame in item["where"]:
                print(f"      at {frame}")
        return
    runs = {(family, option): [] for family in args.families for option in OPTIONS}
    for _ in range(args.rounds):
        for family, option in runs:
            runs[family, option].append(spawn(family, option, args))
    rows = []
    for (family, option), results in runs.items():
        row = {key: max(r[key] for r in results) for key in ("base_mib", "peak_mib", "steps_peak_mib")}
        row.update(family=family, option=option, ms=1e3 * statistics.median([t for r in results for t in r["step_s"]]),
                   warmup_s=statistics.median(r["warmup_s"] for r in results), rounds=len(results),
                   micro_batch=results[0]["micro_batch"], seq_len=results[0]["seq_len"],
                   first_loss=results[0]["losses"][0])
        row["steps_growth_mib"] = row["steps_peak_mib"] - row["base_mib"]
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["family"] == row["family"] and r["option"] == "baseline")
        row["vs_baseline"] = row["ms"] / base["ms"]
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"smoke": args.smoke, "rounds": args.rounds, "warmup": args.warmup,
                                     "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
