"""Run one SparseMixerMoE forward/backward with ep_size = world size; save what each rank saw.

Started by the deepspeed launcher (see tests/test_distributed.py). Each rank routes its own batch
with its own seed; expert parameters are saved under their global expert index.
"""
import argparse
from pathlib import Path

import torch
from deepspeed import comm as dist
from models import EP_CASES, EXPERT_HIDDEN, ep_batch, ep_loss, load_reference_weights, local_expert_offset

from sparsemixer_ds import SparseMixerMoE
from sparsemixer_ds.run.comm import exit_rank, init_distributed
from sparsemixer_ds.models.native import feed_forward

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--case", choices=sorted(EP_CASES), required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
layer = SparseMixerMoE(16, feed_forward(16, EXPERT_HIDDEN), num_experts=4, ep_size=world, **EP_CASES[args.case])
layer.set_deepspeed_parallelism()
load_reference_weights(layer, seed=0)

torch.manual_seed(100 + rank)
out, l_aux, exp_counts = layer(ep_batch(rank))
ep_loss(out, l_aux).backward()

offset = local_expert_offset(layer)
experts = {
    f"{offset + j}.{name}": p.grad
    for j, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts)
    for name, p in expert.named_parameters()
}
result = {
    "out": out.detach(),
    "l_aux": l_aux.detach(),
    "exp_counts": exp_counts,
    "router_grad": layer.gate.wg.weight.grad,
    "omega_grad": None if layer.omega is None else layer.omega.grad,
    "expert_grads": experts,
}
torch.save(result, args.out / f"rank{rank}.pt")
exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
