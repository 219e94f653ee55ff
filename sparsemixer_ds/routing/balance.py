"""The routers' auxiliary losses, shared by both model families (DeepSpeed's MoE layer and AutoEP's).

Shape legend: S tokens, E experts.

Switch Transformer's load-balance loss (Fedus et al. 2021, eq. 4): E * sum_e P_e f_e, with P_e the mean
router probability of expert e over the tokens and f_e the fraction of routes that went to e, counted
from the routes the router actually took (SparseMixer's draws, never a softmax top-k standing in).

- ``local``: P and f over this rank's tokens, so every micro-batch is pushed to balance on its own.
- ``global`` (GRIN, arXiv:2409.12136; Megatron-Core's global aux loss): f from the route counts summed
  over the data-parallel group, so the loss asks for balance over the global batch and leaves a single
  micro-batch free to lean on its experts. Counts carry no gradient: one all-reduce of E + 1 numbers
  per layer and call, and P stays local, so the gradient flows exactly as in the local loss.

ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(z)^2, which keeps
router logits small (bf16 stability).
"""
from typing import Optional

import torch
import torch.distributed

from .registry import BALANCE_MODES

__all__ = ["balance_loss", "z_loss"]


def balance_loss(logits_SE: torch.Tensor, counts_E: torch.Tensor, routes: int, mode: str = "local",
                 group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
    """Switch's balance loss (scalar, float32; 1 at perfect balance) of one router call.

    ``counts_E``: routes each expert took in this call; ``routes``: how many routes the call had to
    give (tokens x top_k), the denominator of the fractions. ``mode``
    "global" sums both over ``group`` (None: every rank, the data-parallel group when each rank
    trains on its own tokens) before the fractions are taken; on one process it equals "local".
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance mode must be one of {', '.join(BALANCE_MODES)}; got {mode!r}")
    num_experts = logits_SE.shape[1]
    probs_SE = torch.softmax(logits_SE.float(), dim=1)
    counts = torch.cat([counts_E.detach().float(), counts_E.new_tensor([routes], dtype=torch.float32)])
    if mode == "global" and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(counts, group=group)
    fraction_E = counts[:-1] / counts[-1].clamp_min(1)
    return num_experts * torch.sum(probs_SE.mean(dim=0) * fraction_E)


def z_loss(logits_SE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (scalar, float32)."""
    return torch.logsumexp(logits_SE.float(), dim=1).square().mean()
