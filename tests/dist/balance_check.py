"""The global balance loss (GRIN) of the native gates on two ranks that route different batches.

Started by the deepspeed launcher (see tests/test_balance.py). For each gate case every rank routes its
own batch twice with the same seed, with ``balance="local"`` and ``balance="global"``, and back-propagates
the global loss to the router weight. The expected value is written out here from all-gathered router
inputs and route counts, without sparsemixer_ds.routing.balance:
    E * sum_e P_e * f_e,   P_e = this rank's mean softmax(logits)_e,
                           f_e = (counts_e summed over ranks) / (routes S * k summed over ranks),
and its gradient is autograd's through P with the counts held constant. Each rank saves both.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter

from sparsemixer_ds import SparseMixerGate
from sparsemixer_ds.run.comm import exit_rank, init_distributed
from sparsemixer_ds.models.moe import BaselineGate

MODEL_DIM, NUM_EXPERTS, TOKENS = 16, 4, 48
CASES = {  # name: (gate class, top-k, SparseMixer estimator)
    "sparsemixer-midpoint-k1": (SparseMixerGate, 1, "midpoint"),
    "sparsemixer-heun3-k2": (SparseMixerGate, 2, "heun3"),
    "switch-k1": (BaselineGate, 1, None),
}

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()


def make_gate(case: str, balance: str):
    cls, k, estimator = CASES[case]
    torch.manual_seed(0)  # the same router weight on every rank and in both modes
    if cls is BaselineGate:  # switch: DeepSpeed's top-1 gate with its input jitter
        stock = TopKGate(MODEL_DIM, NUM_EXPERTS, k=k, min_capacity=4, noisy_gate_policy="Jitter")
        return BaselineGate.from_topk_gate(stock, balance=balance)
    return SparseMixerGate(MODEL_DIM, NUM_EXPERTS, k=k, estimator=estimator, balance=balance)


def rank_batch(rank: int) -> torch.Tensor:
    """(S, M): the ranks' tokens lean in opposite directions, so their route shares differ."""
    lean = torch.randn(MODEL_DIM, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(TOKENS, MODEL_DIM, generator=torch.Generator().manual_seed(1000 + rank))
    return noise + (2 * rank - 1) * 2.0 * lean


def gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def check(case: str) -> dict:
    k = CASES[case][1]
    x = rank_batch(rank)
    seen = {}
    for balance in ("local", "global"):
        gate = make_gate(case, balance)
        torch.manual_seed(50 + rank)  # the same routes in both modes
        routes = gate(x, None, True)
        seen[balance] = (gate.terms.balance, routes[-1])
        if balance == "global":
            routes[0].backward()  # l_aux = 1 * balance
            grad = gate.wg.weight.grad.clone()
    # The router input as the gate saw it: the same seed redraws the input jitter.
    torch.manual_seed(50 + rank)
    router_input = multiplicative_jitter(x, device=x.device) if gate.noisy_gate_policy == "Jitter" else x
    counts = seen["global"][1]

    inputs_RSM, counts_RE = gather(router_input.contiguous()), gather(counts)
    weight = gate.wg.weight.detach().double().requires_grad_()
    fraction_E = counts_RE.sum(dim=0).double() / (world * TOKENS * k)
    local_fraction_E = counts.double() / (TOKENS * k)

    def switch_balance(router_input_SM, fraction_E):
        probs_SE = torch.softmax(F.linear(router_input_SM.double(), weight), dim=1)
        return NUM_EXPERTS * (probs_SE.mean(dim=0) * fraction_E).sum()

    expect_R = torch.stack([switch_balance(inputs_RSM[r], fraction_E) for r in range(world)])
    (grad_expect, ) = torch.autograd.grad(expect_R[rank], weight)
    return {
        "global_R": gather(seen["global"][0].reshape(1)).flatten(),  # every rank's reported global value
        "expect_R": expect_R.detach(),
        "local": seen["local"][0],
        "local_expect": switch_balance(router_input, local_fraction_E).detach(),
        "same_routes": bool(torch.equal(seen["local"][1], counts)),
        "counts_RE": counts_RE,
        "grad": grad,
        "grad_expect": grad_expect,
    }


results = {case: check(case) for case in CASES}
torch.save(results, args.out / f"rank{rank}.pt")
exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
