"""The router contract, once, for both MoE paths: from router logits to routes, weights, per-expert counts and
the auxiliary losses, plus the statistics and logged terms. Torch only (no DeepSpeed import).

Shape legend: S tokens, E experts, K routes per token (top_k).

DeepSpeed's MoE layer (sparsemixer_ds.models.moe: SparseMixerGate) and AutoEP (sparsemixer_ds.models.autoep:
SparseMixerRouter) are adapters onto their host's contract around ``sparsemixer_routes``: the gate adds
capacity and slots, the AutoEP router int32 counts. Each auxiliary loss takes its coefficient where it is
computed (as Megatron-Core's router does), so a caller adds ``l_aux`` to its loss as it is.
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .balance import balance_loss, z_loss
from .estimator import route, use_fused
from .registry import RouterOptions

__all__ = ["MoETerms", "Routed", "RoutingStats", "sparsemixer_routes", "aux_losses", "expert_counts", "sum_terms"]

# The group "global" balances over: the data-parallel group of the dense (non-expert) parameters. In this
# project that is every rank (None): each rank trains on its own tokens, and expert parallelism places
# experts across ranks without splitting a batch, so the global batch is the union of all ranks' tokens.
GLOBAL_BALANCE_GROUP = None


class MoETerms(NamedTuple):
    """A router call's auxiliary losses before their coefficients (detached, for logging)."""
    balance: torch.Tensor  # scalar: Switch's load-balance loss
    z: torch.Tensor  # scalar: ST-MoE's router z-loss (0 where the router has none)


class Routed(NamedTuple):
    """One SparseMixer router call."""
    experts_SK: torch.Tensor  # int64 [S, K]: the chosen experts, round by round
    weights_SK: torch.Tensor  # float32 [S, K]: their SparseMixer weights (estimator.sparsemixer)
    counts_E: torch.Tensor  # int64 [E]: routes each expert took, of the routed tokens
    l_aux: torch.Tensor  # scalar: balance_coef * balance (+ z_loss_coef * z), with its gradient
    terms: MoETerms


def expert_counts(experts_SK: torch.Tensor, num_experts: int, routed_S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routes each expert took, int64 [E]; tokens with ``routed_S`` False are counted nowhere."""
    bucket_SK = experts_SK if routed_S is None else torch.where(routed_S.reshape(-1, 1), experts_SK, num_experts)
    bucket_N = bucket_SK.reshape(-1)
    # A scatter into E + 1 counters (the last for unrouted tokens), not bincount: its output has a fixed
    # shape, so torch.compile traces it.
    return torch.zeros(num_experts + 1, dtype=torch.int64, device=experts_SK.device).scatter_add_(
        0, bucket_N, torch.ones_like(bucket_N))[:num_experts]


def aux_losses(logits_SE: torch.Tensor, counts_E: torch.Tensor, routes: int,
               options: RouterOptions) -> Tuple[torch.Tensor, MoETerms]:
    """Switch's balance loss over the routes taken (``routes``: how many the call had to give, S * K) and, with
    ``z_loss_coef``, ST-MoE's z-loss (eq. 5: keeps router logits small for bf16 stability); returns l_aux, the
    sum with their coefficients, and the unweighted terms."""
    balance = balance_loss(logits_SE, counts_E, routes, options.balance, GLOBAL_BALANCE_GROUP)
    l_aux = options.balance_coef * balance
    z = torch.zeros((), device=logits_SE.device)
    if options.z_loss_coef > 0:
        z = z_loss(logits_SE)
        l_aux = l_aux + options.z_loss_coef * z
    return l_aux, MoETerms(balance.detach(), z.detach())


def sparsemixer_routes(logits_SE: torch.Tensor, top_k: int, options: RouterOptions, training: bool,
                       routed_S: Optional[torch.Tensor] = None) -> Routed:
    """Route S tokens from their logits [S, E] (any float dtype) with checked ``options``: SparseMixer's draws
    and weights, the per-expert counts (of the tokens with ``routed_S``, all by default), and the auxiliary
    losses. The balance loss takes its fractions from the routes drawn, over S * K."""
    experts_SK, weights_SK = route(logits_SE, top_k, float(options.jitter_eps), training, options.rule,
                                   use_fused(options.routing_impl, logits_SE))
    counts_E = expert_counts(experts_SK, logits_SE.shape[1], routed_S)
    l_aux, terms = aux_losses(logits_SE, counts_E, experts_SK.numel(), options)
    return Routed(experts_SK, weights_SK, counts_E, l_aux, terms)


def sum_terms(terms: Sequence[MoETerms]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The balance and z terms summed over a model's MoE layers, float32 scalars (for the logged loss parts)."""
    return (torch.stack([t.balance.float() for t in terms]).sum(), torch.stack([t.z.float() for t in terms]).sum())


class RoutingStats:
    """One router's routing statistics, summed over the calls it makes while ``recording`` is on.

    Per call: each expert's share of the routes before capacity, the share of routes dropped (over
    capacity, or of unused tokens), and the mean entropy of the router's softmax (nats), from the
    logits and routes the router computed for that call. ``take()`` returns the sums as one flat
    float64 tensor, ready for an all-reduce, and starts over.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.recording = False
        self._sums: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, logits_SE: torch.Tensor, exp_counts_E: torch.Tensor, dropped: torch.Tensor) -> None:
        log_probs_SE = torch.log_softmax(logits_SE.float(), dim=1)
        entropy = -(log_probs_SE.exp() * log_probs_SE).sum(dim=1).mean()
        load_E = exp_counts_E.double() / exp_counts_E.sum().clamp_min(1)
        dropped = dropped.double()
        row = torch.cat([load_E, torch.stack([dropped, entropy.double(), torch.ones_like(dropped)])])
        self._sums = row if self._sums is None else self._sums + row

    def take(self, device: torch.device) -> torch.Tensor:
        """[load_0 .. load_{E-1}, dropped, entropy, calls] summed since the last take."""
        sums = self._sums if self._sums is not None else torch.zeros(self.num_experts + 3, dtype=torch.float64)
        self._sums = None
        return sums.to(device)

    @staticmethod
    def summarize(sums: torch.Tensor) -> dict:
        """Means from ``take()``'s sums (all-reduced or not): load, max/mean load, dropped, entropy."""
        calls = float(sums[-1].clamp_min(1))
        load = (sums[:-3] / calls).tolist()
        mean_load = 1.0 / len(load)
        return {"load": load, "max_mean_load": max(load) / mean_load, "dropped": float(sums[-3]) / calls,
                "entropy": float(sums[-2]) / calls}
