"""Hugging Face MoE models under DeepSpeed's AutoEP: what SparseMixer's router costs, what the HF family costs
against the native one, and what ZeRO-3 saves. Training steps (forward, backward, optimizer) on every rank.

    deepspeed --num_gpus 2 benchmarks/autoep.py --mode router     # SparseMixer vs AutoEP's own router, same model
    deepspeed --num_gpus 2 benchmarks/autoep.py --mode family     # native family vs PhiMoE of the same active size
    deepspeed --num_gpus 2 benchmarks/autoep.py --mode memory --zero 2   # peak memory per rank (run once per stage)

router and family build both engines in one process, with the same initial weights where they share them, and
time them interleaved (A B A B ...): each repeat gives one paired ratio, and the table gives the median ratio
with its interquartile range. memory reports each rank's peak resident memory over the run, and the growth
from just before the model is built (Python, torch and DeepSpeed themselves are in the first, not the second).
"""
import argparse
import json
import os
import resource
import statistics
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from sparsemixer_ds.models import autoep  # noqa: E402
from sparsemixer_ds.run.comm import exit_rank, init_distributed  # noqa: E402
from sparsemixer_ds.config import RunConfig, load_config  # noqa: E402
from sparsemixer_ds.models.families import get_family  # noqa: E402
from sparsemixer_ds.testing import interleaved_samples  # noqa: E402


def run_config(args, family: str) -> RunConfig:
    """The two models of the comparison: PhiMoE (SwiGLU experts, 3 matrices of H x I) and the native LM with
    GELU experts of width 1.5 I (2 matrices), so that both have the same parameters per expert; full
    multi-head attention, every block an MoE block, top-2 SparseMixer-v2, dropless."""
    common = [f"model.seq_len={args.seq_len}", f"moe.ep_size={args.ep_size}", "moe.router=sparsemixer-v2",
              f"model.vocab_size={args.vocab}", f"train.micro_batch={args.batch}"]
    if family == "native":
        return load_config(None, common + [
            f"model.d_model={args.hidden}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
            "moe.top_k=2", f"moe.num_experts={args.experts}", "moe.moe_every=1",
            f"moe.expert_hidden={args.intermediate * 3 // 2}", "moe.drop_tokens=false"])
    hf = {"model_type": "phimoe", "hidden_size": args.hidden, "intermediate_size": args.intermediate,
          "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
          "num_local_experts": args.experts, "num_experts_per_tok": 2, "tie_word_embeddings": True}
    return load_config(None, common + ["model.family=hf", f"model.hf={json.dumps(hf)}"])


def engine_for(cfg: RunConfig, zero: int, own_router: bool = False):
    """A training engine for ``cfg``'s model; ``own_router``: the same HF model with AutoEP's router."""
    family = get_family(cfg)
    ds = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch, "zero_optimization": {"stage": zero},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_allow_untested_optimizer": True}
    ds.update(family.ds_config(cfg, ds, "the benchmark"))
    torch.manual_seed(0)
    if own_router:
        from transformers import AutoModelForCausalLM
        from sparsemixer_ds.models import hf
        model = AutoModelForCausalLM.from_config(hf.hf_config(cfg))
    else:
        model = family.build(cfg)
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    if not own_router and cfg.model.family == "hf":
        autoep.install_routers(engine.module)
    engine.ds_dict = ds
    return engine


def step_of(engine, own_router: bool, tokens: torch.Tensor):
    def step():
        x, y = tokens[:, :-1], tokens[:, 1:]
        if own_router:  # the plain HF model: its logits, the cross-entropy, no balance loss
            logits = engine(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        else:
            loss = engine(x, y).loss
        engine.backward(loss)
        engine.step()
    return step


def ratio_row(samples: dict, a: str, b: str, tokens_per_step: int) -> dict:
    ratios = sorted(x / y for x, y in zip(samples[a], samples[b]))  # tokens/s of b over a: time a / time b
    q = statistics.quantiles(ratios, n=4)
    return {"a": a, "b": b, "tokens_per_s_a": tokens_per_step / statistics.median(samples[a]),
            "tokens_per_s_b": tokens_per_step / statistics.median(samples[b]),
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2], "repeats": len(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["router", "family", "memory"], default="router")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--ep-size", type=int, default=0, help="AutoEP's autoep_size (default: the world size)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed(verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    args.ep_size = args.ep_size or world
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(rank)).to(device)
    tokens_per_step = args.batch * args.seq_len * world
    hf_cfg = run_config(args, "hf")
    rows = []
    if args.mode == "router":
        engines = {"autoep_router": (engine_for(hf_cfg, args.zero, own_router=True), True),
                   "sparsemixer": (engine_for(hf_cfg, args.zero), False)}
        samples = interleaved_samples({n: step_of(e, own, tokens) for n, (e, own) in engines.items()}, args.repeats, device)
        rows.append(ratio_row(samples, "autoep_router", "sparsemixer", tokens_per_step))
    elif args.mode == "family":
        engines = {"native": engine_for(run_config(args, "native"), min(args.zero, 2)),
                   "hf_phimoe": engine_for(hf_cfg, args.zero)}
        samples = interleaved_samples({n: step_of(e, False, tokens) for n, e in engines.items()}, args.repeats, device)
        rows.append(ratio_row(samples, "native", "hf_phimoe", tokens_per_step))
        rows[-1]["params"] = {n: sum(p.numel() for p in e.module.parameters()) for n, e in engines.items()}
    else:
        before = psutil.Process().memory_info().rss
        engine = engine_for(hf_cfg, args.zero)
        step = step_of(engine, False, tokens)
        for _ in range(args.repeats):
            step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats = torch.tensor([peak, peak - before], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        torch.distributed.all_gather(gathered, stats)
        estimate = get_family(hf_cfg).memory_estimate(hf_cfg, engine.ds_dict, world)
        rows.append({"zero": args.zero, "peak_rss_mib": [float(g[0]) / 2**20 for g in gathered],
                     "growth_mib": [float(g[1]) / 2**20 for g in gathered],
                     "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
                     "estimate_mib": estimate.total / 2**20})
    if rank == 0:
        shape = (f"PhiMoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts of width "
                 f"{args.intermediate}, top-2, {args.batch} x {args.seq_len} tokens per rank, {world} ranks, "
                 f"ep_size {args.ep_size}, ZeRO {args.zero}, {device}, {torch.get_num_threads()} threads")
        print(f"{args.mode}: {shape}")
        for row in rows:
            if args.mode == "memory":
                print(f"ZeRO {row['zero']}: peak RSS per rank (MiB) {[round(v) for v in row['peak_rss_mib']]}, "
                      f"growth from before the model {[round(v) for v in row['growth_mib']]}; the pre-flight "
                      f"estimate of the training state: {row['estimate_mib']:.0f} MiB per rank")
            else:
                print(f"{'':<14} {'tokens/s':>10}\n{row['a']:<14} {row['tokens_per_s_a']:>10,.0f}\n"
                      f"{row['b']:<14} {row['tokens_per_s_b']:>10,.0f}\n"
                      f"{row['b']} / {row['a']}: {row['ratio_median']:.3f}x (paired, median of {row['repeats']}; "
                      f"interquartile {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f})")
        out = args.out or Path(f"benchmarks/results/autoep_{args.mode}" +
                               (f"_zero{args.zero}" if args.mode == "memory" else "") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
    exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
