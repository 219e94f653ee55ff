"""MoE layer overhead: SparseMixerMoE vs DeepSpeed's MoE, forward + backward, same experts and capacity.

The SparseMixer layer is made from the DeepSpeed one with ``convert`` on a copy, so both hold the
same router and expert weights. Interleaved runs (A B A B ...), medians.

    python benchmarks/moe_layer.py                                   # ep_size 1, one process
    deepspeed --num_gpus 2 benchmarks/moe_layer.py --out ep2.json    # ep_size 2 (2 ranks, gloo on CPU)
    python benchmarks/moe_layer.py --smoke
"""
import argparse
import copy
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.moe.layer import MoE  # noqa: E402

from sparsemixer_ds import convert  # noqa: E402
from sparsemixer_ds.run.comm import exit_rank, init_distributed  # noqa: E402
from sparsemixer_ds.models.native import feed_forward  # noqa: E402
from sparsemixer_ds.routing.registry import ROUTERS  # noqa: E402
from sparsemixer_ds.testing import time_interleaved  # noqa: E402

# DeepSpeed's baseline and the SparseMixer router it is compared with, at the baseline's k.
PAIRS = [(ROUTERS["switch"], ROUTERS["sparsemixer"]), (ROUTERS["gshard"], ROUTERS["sparsemixer-v2"])]


def bench(tokens: int, d: int, hidden: int, experts: int, repeats: int, ep_size: int, device) -> list:
    rows = []
    for baseline, mixer_router in PAIRS:
        k, estimator = baseline.top_k[0], mixer_router.estimator
        torch.manual_seed(0)
        stock = MoE(d, feed_forward(d, hidden), num_experts=experts, ep_size=ep_size, k=k, capacity_factor=1.25,
                    min_capacity=4, noisy_gate_policy="Jitter" if baseline.input_jitter else None)
        mixer = torch.nn.Sequential(copy.deepcopy(stock))
        convert(mixer, estimator=estimator)
        mixer = mixer[0]
        layers = {"deepspeed": stock, "sparsemixer": mixer}
        for layer in layers.values():
            layer.to(device)
            if ep_size > 1:
                layer.set_deepspeed_parallelism()
        x = torch.randn(tokens, d, device=device)

        def step_of(layer):
            def step():
                out, l_aux, _ = layer(x)
                (out.square().mean() + l_aux).backward()
            return step

        medians = time_interleaved({name: step_of(layer) for name, layer in layers.items()}, repeats, device)
        ds_ms, sm_ms = (medians[n] * 1e3 for n in ("deepspeed", "sparsemixer"))
        rows.append({"baseline": baseline.name, "k": k, "estimator": estimator, "tokens": tokens, "dim": d,
                     "expert_hidden": hidden, "experts": experts, "ep_size": ep_size, "deepspeed_ms": ds_ms,
                     "sparsemixer_ms": sm_ms, "ratio": sm_ms / ds_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/moe_layer_epN.json)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.dim, args.expert_hidden, args.repeats = 256, 32, 64, 3
    launched = "RANK" in os.environ
    if launched:
        init_distributed()
    ep_size = torch.distributed.get_world_size() if launched else 1
    rank = torch.distributed.get_rank() if launched else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    rows = bench(args.tokens, args.dim, args.expert_hidden, args.experts, args.repeats, ep_size, device)
    if rank != 0:
        return
    print(f"MoE layer forward+backward, median of {args.repeats} interleaved runs, {device}, ep_size {ep_size}, "
          f"{args.tokens} tokens per rank, d={args.dim}, expert hidden {args.expert_hidden}, {args.experts} experts")
    header = f"{'baseline':<9} {'k':>2} {'estimator':<9} | {'DeepSpeed MoE ms':>16} {'SparseMixerMoE ms':>17} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['baseline']:<9} {r['k']:>2} {r['estimator']:<9} | {r['deepspeed_ms']:>16.2f} "
              f"{r['sparsemixer_ms']:>17.2f} | {r['ratio']:>5.2f}x")
    out = args.out or Path(f"benchmarks/results/moe_layer_ep{ep_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
