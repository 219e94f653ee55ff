"""SparseMixer as a DeepSpeed MoE gate and layer: the only module that touches DeepSpeed's MoE layer and gates.

Shape legend: S tokens, E experts, K routes per token, C capacity (slots per expert), M model dim.

DeepSpeed's engine finds MoE layers by ``isinstance(m, deepspeed.moe.layer.MoE)`` and gates by
``isinstance(m, TopKGate)``, and its MOELayer does the all-to-all dispatch over the expert-parallel
group. So SparseMixer subclasses both and only replaces the routing decision: everything else
(expert placement, checkpoints per expert, parameter groups) stays DeepSpeed's.

Every gate here (SparseMixer's, and DeepSpeed's TopKGate as the baselines use it) weights its own
auxiliary losses (``balance_coef``, ``z_loss_coef``) in the ``l_aux`` it returns, keeps the unweighted
values of its last call in ``terms`` for logging, and records routing statistics in ``stats`` from the
logits and routes it computed (Megatron-Core's router does the same). The balance loss is
``local`` (each rank's micro-batch) or ``global`` (route fractions summed over the data-parallel
group first, GRIN's choice), as in sparsemixer_ds.routing.balance.
"""
import dataclasses
import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TOPK_GATE_TIMER, TopKGate, multiplicative_jitter, top1gating, top2gating
from torch import nn

from ..routing.balance import balance_loss
from ..routing.core import GLOBAL_BALANCE_GROUP, MoETerms, Routed, RoutingStats, sparsemixer_routes
from ..routing.registry import Router, RouterOptionError, RouterOptions, check_top_k

__all__ = ["SparseMixerGate", "SparseMixerMoE", "BaselineGate", "convert", "Routes", "make_moe", "moe_gates"]


class Routes(NamedTuple):
    """One gate call's routing, in the sparse layout DeepSpeed's MOELayer dispatches."""
    l_aux: torch.Tensor  # scalar: balance_coef * balance loss (+ z_loss_coef * z-loss)
    capacity: torch.Tensor  # int64 scalar: slots per expert, C
    num_experts: int  # E
    indices_KS: torch.Tensor  # int32 [K, S]: expert of each route, -1 where dropped
    locations_KS: torch.Tensor  # int32 [K, S]: slot of each route in its expert's buffer
    gates_KS: torch.Tensor  # float32 [K, S]: SparseMixer weight of each route, 0 where dropped
    exp_counts: torch.Tensor  # int64 [E]: routes each expert was chosen for, before capacity


def _check_capacity(num_experts: int, k: int, capacity_factor: float, eval_capacity_factor: float,
                    min_capacity: int, noisy_gate_policy: Optional[str], top2_2nd_expert_sampling: bool) -> None:
    """Reject the DeepSpeed gate's own settings that SparseMixer cannot honour, before any module is built
    (the router options are RouterOptions.check()'s)."""
    check_top_k(k, num_experts, "k")
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not isinstance(value, (int, float)) or not 0 < float(value) < math.inf:
            raise ValueError(f"{name} must be a finite number > 0 (1.0 to 2.0 is usual); got {value!r}")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an integer >= 0; got {min_capacity!r}")
    if noisy_gate_policy not in (None, "None"):
        raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} is not used with SparseMixer, which samples "
                         "its routes itself; pass noisy_gate_policy=None and set jitter_eps instead")
    if top2_2nd_expert_sampling is not True:
        raise ValueError(f"top2_2nd_expert_sampling={top2_2nd_expert_sampling!r}: SparseMixer samples every route "
                         "(that is its estimator); leave it True")


class SparseMixerGate(TopKGate):
    """A DeepSpeed gate whose routes and weights come from SparseMixer (sparsemixer_ds.routing.core).

    Takes TopKGate's constructor arguments plus ``jitter_eps``, ``estimator``, ``balance_coef``,
    ``balance`` ("local" or "global", see sparsemixer_ds.routing.balance), ``z_loss_coef`` and ``routing_impl``
    ("auto", "eager" or "fused": how the estimator runs, see sparsemixer_ds.routing.estimator.use_fused).
    ``noisy_gate_policy`` must stay None (SparseMixer samples its routes) and
    ``top2_2nd_expert_sampling`` True. Capacity follows DeepSpeed: C = max(ceil(S / E * factor * k),
    min_capacity) slots per expert, or with ``drop_tokens=False`` the largest expert load over the
    expert-parallel group. Earlier rounds claim slots first; within a round, tokens claim them in
    order, or in a random order with ``use_rts`` (random token selection). The returned ``l_aux`` is
    ``balance_coef * balance + z_loss_coef * z``: with the default ``balance_coef=1`` the balance loss
    as DeepSpeed's gates return it, for a caller that weights it itself. The balance loss takes its
    route fractions from the routes SparseMixer drew (``exp_counts`` over S * k, before capacity);
    with ``balance="global"`` every call all-reduces E + 1 numbers over all ranks, so every rank must
    call the gate equally often (the MoE layer's all-to-all asks the same).
    """

    def __init__(self,
                 model_dim: int,
                 num_experts: int,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 8,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 ep_group: Union[torch.distributed.ProcessGroup, None] = None,
                 top2_2nd_expert_sampling: bool = True,
                 *,
                 jitter_eps: float = 0.1,
                 estimator: str = "midpoint",
                 balance_coef: float = 1.0,
                 balance: str = "local",
                 z_loss_coef: float = 0.0,
                 routing_impl: str = "auto") -> None:
        # Every option is checked before DeepSpeed builds anything.
        options = RouterOptions(estimator=estimator, jitter_eps=float(jitter_eps), balance_coef=float(balance_coef),
                                balance=balance, z_loss_coef=float(z_loss_coef), routing_impl=routing_impl).check()
        _check_capacity(num_experts, k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy,
                        top2_2nd_expert_sampling)
        if estimator is None:
            raise RouterOptionError("estimator=None is DeepSpeed's TopKGate: use BaselineGate (or make_moe) for the "
                                    "switch and gshard baselines")
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity, None,
                         drop_tokens, use_rts, ep_group, True)
        self.num_experts = num_experts
        self.options = options
        self.stats = RoutingStats(num_experts)
        self.terms: Optional[MoETerms] = None

    @classmethod
    def from_topk_gate(cls, gate: TopKGate, **sparsemixer_kwargs) -> "SparseMixerGate":
        """A SparseMixer gate that keeps ``gate``'s router weights, capacity settings and EP group."""
        return _rebuild(cls, gate, None, True, **sparsemixer_kwargs)

    def extra_repr(self) -> str:
        o = self.options
        return (f"num_experts={self.num_experts}, k={self.k}, estimator={o.estimator!r}, "
                f"jitter_eps={o.jitter_eps}, capacity_factor={self.capacity_factor}, "
                f"drop_tokens={self.drop_tokens}, balance={o.balance!r}, balance_coef={o.balance_coef}, "
                f"z_loss_coef={o.z_loss_coef}, routing_impl={o.routing_impl!r}")

    def forward(self,
                input: torch.Tensor,
                used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False,
                use_tutel: bool = False) -> tuple:
        """Route ``input`` [S, M].

        Returns, with ``sparse_routes`` (DeepSpeed >= 0.19.4's MOELayer), the 7-tuple
        ``Routes(l_aux, capacity, E, indices_KS, locations_KS, gates_KS, exp_counts)``; otherwise the
        dense ``(l_aux, combine_weights_SEC, dispatch_mask_SEC, exp_counts)`` of older releases.
        ``use_tutel`` changes nothing here: the locations are the same either way.
        """
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).start()
        logits_SE = F.linear(input.float(), self.wg.weight.float())
        used_S = None if used_token is None else used_token.reshape(-1) != 0
        routed = sparsemixer_routes(logits_SE, self.k, self.options, self.training, used_S)
        self.terms = routed.terms
        routes = self._dispatch_routes(routed, used_S)
        if self.stats.recording:
            self.stats.add(logits_SE, routes.exp_counts, (routes.indices_KS < 0).double().mean())
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).stop()
            self.gate_time = self.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        return routes if sparse_routes else _dense_routes(routes)

    def _capacity(self, num_tokens: int, exp_counts: torch.Tensor) -> torch.Tensor:
        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            slots = max(math.ceil(num_tokens / self.num_experts * factor * self.k), self.min_capacity)
            return torch.tensor(slots, dtype=torch.int64, device=exp_counts.device)
        # Dropless: every rank must size its buffers for the busiest expert anywhere in the group,
        # because the all-to-all exchanges equal-sized [E, C, M] blocks.
        capacity = exp_counts.max().clamp_min(1)
        if pg_utils.is_parallel(self.ep_group):
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        return capacity

    def _dispatch_routes(self, routed: Routed, used_S: Optional[torch.Tensor]) -> Routes:
        """Capacity and each route's slot in its expert's buffer, for the routes ``routed`` drew."""
        num_tokens, num_experts = routed.experts_SK.shape[0], self.num_experts
        device = routed.experts_SK.device
        experts_KS, exp_counts = routed.experts_SK.t(), routed.counts_E
        routed_KS = torch.ones_like(experts_KS, dtype=torch.bool)
        if used_S is not None:
            routed_KS = routed_KS & used_S.reshape(1, num_tokens)
        # Unrouted tokens go to a virtual expert E: counted nowhere (routed.counts_E), sorted last.
        bucket_N = torch.where(routed_KS, experts_KS, num_experts).reshape(-1)  # N = K * S routes
        capacity = self._capacity(num_tokens, exp_counts)

        # Slot of each route in its expert's buffer = how many routes of the same expert come first
        # in priority order: round 0 before round 1, then tokens in order or, with RTS, in a random
        # order. One sort of the K * S routes by (expert, priority), linear in tokens x k rather than
        # a running count over a tokens x experts table.
        num_routes = bucket_N.numel()
        priority_KS = torch.arange(num_routes, device=device).view_as(experts_KS)
        if self.use_rts:
            priority_KS = priority_KS - torch.arange(num_tokens, device=device) + torch.randperm(num_tokens, device=device)
        order_N = torch.argsort(bucket_N * num_routes + priority_KS.reshape(-1))
        starts_E = torch.cumsum(exp_counts, dim=0) - exp_counts
        ranks_N = torch.arange(num_routes, device=device) - starts_E.index_select(0, bucket_N[order_N].clamp_max(num_experts - 1))
        locations_KS = torch.empty_like(ranks_N).index_copy_(0, order_N, ranks_N).view_as(experts_KS)
        kept_KS = routed_KS & (locations_KS < capacity)
        return Routes(l_aux=routed.l_aux,
                      capacity=capacity,
                      num_experts=num_experts,
                      indices_KS=torch.where(kept_KS, experts_KS, -1).to(torch.int32),
                      locations_KS=torch.where(kept_KS, locations_KS, 0).to(torch.int32),
                      gates_KS=routed.weights_SK.t() * kept_KS,
                      exp_counts=exp_counts)


def _dense_routes(routes: Routes) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same routes as ``(l_aux, combine_weights_SEC, dispatch_mask_SEC, exp_counts)``."""
    num_tokens = routes.indices_KS.shape[1]
    capacity = int(routes.capacity)
    kept_KS = routes.indices_KS >= 0
    # Dropped routes land on one scratch column past the last slot, cut off below, so that no
    # write of theirs can touch a kept route's slot.
    scratch = routes.num_experts * capacity
    slot_SK = torch.where(kept_KS, routes.indices_KS.long() * capacity + routes.locations_KS.long(), scratch).t()
    flat_shape = (num_tokens, scratch + 1)
    combine_SX = routes.gates_KS.new_zeros(flat_shape).scatter_add(1, slot_SK, routes.gates_KS.t())[:, :-1]
    dispatch_SX = torch.zeros(flat_shape, dtype=torch.bool, device=slot_SK.device).scatter_(1, slot_SK, True)[:, :-1]
    sec_shape = (num_tokens, routes.num_experts, capacity)
    return routes.l_aux, combine_SX.reshape(sec_shape), dispatch_SX.reshape(sec_shape), routes.exp_counts


class BaselineGate(TopKGate):
    """DeepSpeed's TopKGate as the switch (k = 1) and gshard (k = 2) routers use it: DeepSpeed's own
    routing functions, called as TopKGate calls them, with the balance loss weighted by
    ``balance_coef`` in the returned ``l_aux`` and routing statistics recorded from the logits it
    computed (after the input jitter, where the gate has it).

    ``balance="local"`` keeps DeepSpeed's own l_aux. ``balance="global"`` replaces it by
    ``balance_loss(logits_SE, exp_counts, S * k, "global")`` (sparsemixer_ds.routing.balance): the logits after
    the input jitter and before top2gating's Gumbel noise (the ones DeepSpeed's softmax reads), and the
    route counts DeepSpeed returns (before capacity), summed over all ranks. What that is on one
    process, with the same routes, against DeepSpeed 0.19's formulas (P_e = mean over the S tokens of
    softmax(logits)_e; both carry gradient only through P):

    - k = 1: top1gating's l_aux = E * sum_e P_e * mean_s(mask1)_e, mask1 the one-hot choice (times
      ``used_token``) before capacity, and exp_counts = sum_s mask1. So mean_s(mask1) = exp_counts / S
      and "global" on one process is DeepSpeed's l_aux (to float rounding).
    - k = 2: top2gating's l_aux = E * E * mean_e(P_e * mean_s(mask1)_e) = E * sum_e P_e * c1_e / S,
      with c1 the counts of the first (argmax) choices only, while its exp_counts = c1 + c2 also counts
      the sampled second choices. "global" takes f_e = (c1_e + c2_e) / (2 S), the share of all routes,
      so on one process it is E * sum_e P_e (c1_e + c2_e) / (2 S) = (DeepSpeed's l_aux + E * sum_e
      P_e c2_e / S) / 2, DeepSpeed's value only where sum_e P_e c2_e = sum_e P_e c1_e; it is
      ``balance_loss(..., "local")`` with those counts. That is the definition SparseMixer's gate and
      Megatron-Core's aux loss use (all top-k routes over S * k), so a local-vs-global study compares
      one quantity across routers.
    """

    def __init__(self, *topk_gate_args, balance_coef: float = 1.0, balance: str = "local",
                 **topk_gate_kwargs) -> None:
        options = RouterOptions(estimator=None, balance_coef=float(balance_coef), balance=balance).check()
        super().__init__(*topk_gate_args, **topk_gate_kwargs)
        if self.k not in (1, 2):
            raise ValueError(f"k must be 1 or 2 for DeepSpeed's TopKGate baselines; got {self.k!r}")
        self.options = options
        self.stats = RoutingStats(self.wg.out_features)
        self.terms: Optional[MoETerms] = None

    @classmethod
    def from_topk_gate(cls, gate: TopKGate, balance_coef: float = 1.0, balance: str = "local") -> "BaselineGate":
        """``gate`` with its router weights, capacity settings, jitter and EP group."""
        return _rebuild(cls, gate, gate.noisy_gate_policy, gate.top2_2nd_expert_sampling, balance_coef=balance_coef,
                        balance=balance)

    def forward(self,
                input: torch.Tensor,
                used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False,
                use_tutel: bool = False) -> tuple:
        """Route ``input`` [S, M]; returns what TopKGate returns, its ``l_aux`` weighted (and global
        with ``balance="global"``)."""
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).start()
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits_SE = F.linear(input_fp32, self.wg.weight.float())
        # top2gating adds its sampling noise to the logits in place: the global balance loss (through
        # autograd) and the statistics read them before.
        clean_logits_SE = None
        if self.options.balance == "global":
            clean_logits_SE = logits_SE.clone()
        elif self.stats.recording:
            clean_logits_SE = logits_SE.detach().clone()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            routes = top1gating(logits_SE, factor, self.min_capacity, used_token,
                                self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                                self.ep_group, sparse_routes, use_tutel)
        else:
            routes = top2gating(logits_SE, factor, self.min_capacity, self.drop_tokens, self.ep_group,
                                self.top2_2nd_expert_sampling, sparse_routes)
        balance, exp_counts = routes[0], routes[-1]
        if self.options.balance == "global":
            balance = balance_loss(clean_logits_SE, exp_counts, logits_SE.shape[0] * self.k, "global",
                                   GLOBAL_BALANCE_GROUP)
        self.terms = MoETerms(balance.detach(), torch.zeros((), device=balance.device))
        if self.stats.recording:
            if sparse_routes:
                dropped = (routes[3] < 0).double().mean()
            else:  # dense: the dispatch mask [S, E, C] holds one True per kept route
                dropped = 1.0 - routes[2].sum().double() / (logits_SE.shape[0] * self.k)
            self.stats.add(clean_logits_SE, exp_counts, dropped)
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).stop()
            self.gate_time = self.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        return (self.options.balance_coef * balance, *routes[1:])


def _rebuild(cls, gate: TopKGate, noisy_gate_policy: Optional[str], top2_2nd_expert_sampling: bool, **kwargs):
    """A gate of class ``cls`` with ``gate``'s router weight (the same Parameter: trained values,
    device and dtype are kept), capacity settings and EP group."""
    # The new gate's own router weight is replaced at once, so it is drawn outside the global RNG
    # stream: building it leaves every later random draw (other layers' weights, routing) as it was.
    with torch.random.fork_rng(devices=[]):
        new = cls(gate.wg.in_features, gate.wg.out_features, gate.k, gate.capacity_factor, gate.eval_capacity_factor,
                  gate.min_capacity, noisy_gate_policy, gate.drop_tokens, gate.use_rts, gate.ep_group,
                  top2_2nd_expert_sampling, **kwargs)
    new.wg = gate.wg
    new.wall_clock_breakdown = gate.wall_clock_breakdown
    return new


class SparseMixerMoE(MoE):
    """DeepSpeed's MoE layer with a SparseMixerGate; returns ``(output, l_aux, exp_counts)``.

    Takes MoE's constructor arguments plus the gate's ``jitter_eps``, ``estimator``, ``balance_coef``,
    ``balance``, ``z_loss_coef`` and ``routing_impl``. With the midpoint estimator (and its midpoint-all ablation) it owns
    SparseMixer's per-channel output scale ``omega`` [M] (initialised to ones, trained, a non-expert
    parameter), applied to the experts' combined output.
    """

    def __init__(self,
                 hidden_size: int,
                 expert: nn.Module,
                 num_experts: int = 1,
                 ep_size: int = 1,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True,
                 *,
                 jitter_eps: float = 0.1,
                 estimator: str = "midpoint",
                 balance_coef: float = 1.0,
                 balance: str = "local",
                 z_loss_coef: float = 0.0,
                 routing_impl: str = "auto") -> None:
        if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}: each rank of an "
                             "expert-parallel group holds num_experts / ep_size experts")
        # The gate checks every routing option before DeepSpeed builds (and copies) the experts.
        gate = SparseMixerGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                               noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                               jitter_eps=jitter_eps, estimator=estimator, balance_coef=balance_coef,
                               balance=balance, z_loss_coef=z_loss_coef, routing_impl=routing_impl)
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, None, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, True)
        self._install_gate(gate)

    def _install_gate(self, gate: SparseMixerGate) -> None:
        """Swap ``gate`` into the MOELayer and add omega where the estimator has one."""
        self.deepspeed_moe.gate = gate
        weight = gate.wg.weight
        omega = None
        if gate.options.omega:
            omega = nn.Parameter(torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device))
        self.register_parameter("omega", omega)

    @property
    def gate(self) -> SparseMixerGate:
        return self.deepspeed_moe.gate

    def forward(self,
                hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states`` [..., M] -> (output [..., M], l_aux, exp_counts [E])."""
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.omega is not None:
            output = output * self.omega
        if self.use_residual:  # Residual MoE (DeepSpeed-MoE, arXiv:2201.05596), as deepspeed.moe.layer.MoE does it
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts


def convert(model: nn.Module, **sparsemixer_kwargs) -> int:
    """Turn every DeepSpeed MoE layer of ``model`` into a SparseMixerMoE, in place.

    Call it before ``deepspeed.initialize``. Router weights, capacity settings, experts and
    residual-MoE parts are kept (the same parameter objects); ``sparsemixer_kwargs`` are
    ``jitter_eps``, ``estimator``, ``balance_coef``, ``balance``, ``z_loss_coef`` and ``routing_impl``. A layer's
    ``noisy_gate_policy`` is dropped: SparseMixer's sampling replaces input jitter. Draws no random
    numbers. Returns how many layers were converted.
    """
    options = ("jitter_eps", "estimator", "balance_coef", "balance", "z_loss_coef", "routing_impl")
    unknown = set(sparsemixer_kwargs) - set(options)
    if unknown:
        raise TypeError(f"convert() got unknown options {sorted(unknown)}; it takes {', '.join(options)}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"convert() found no deepspeed.moe.layer.MoE layer in {type(model).__name__}; build the "
                         "model's MoE blocks with deepspeed.moe.layer.MoE (or use SparseMixerMoE directly)")
    targets = [m for m in layers if not isinstance(m, SparseMixerMoE)]
    # Build every new gate first, so a bad option leaves the model untouched.
    gates = [SparseMixerGate.from_topk_gate(m.deepspeed_moe.gate, **sparsemixer_kwargs) for m in targets]
    for layer, gate in zip(targets, gates):
        # The layer keeps its identity, experts, process groups and hooks; only its class and gate change.
        layer.__class__ = SparseMixerMoE
        layer._install_gate(gate)
    return len(targets)


def make_moe(router: Router,
             hidden_size: int,
             expert: nn.Module,
             *,
             num_experts: int,
             ep_size: int = 1,
             k: int = 1,
             capacity_factor: float = 1.0,
             eval_capacity_factor: float = 1.0,
             min_capacity: int = 4,
             drop_tokens: bool = True,
             options: RouterOptions = RouterOptions()) -> MoE:
    """An MoE layer for a registered router (sparsemixer_ds.routing.registry), so that comparing routers is one
    config change: a SparseMixerMoE with the router's estimator, or DeepSpeed's MoE with a BaselineGate
    (TopKGate with k = 1 and input jitter for switch, k = 2 for gshard). The gate weights its own
    auxiliary losses with the ``options``' coefficients and takes its balance loss "local" or "global"
    (over all ranks; see BaselineGate for the baselines); ``options.estimator`` is the router's own."""
    options = dataclasses.replace(options, estimator=router.estimator).check()  # before DeepSpeed builds experts
    common = dict(num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
                  eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity, drop_tokens=drop_tokens)
    if not router.baseline:
        return SparseMixerMoE(hidden_size, expert, jitter_eps=options.jitter_eps, estimator=options.estimator,
                              balance_coef=options.balance_coef, balance=options.balance,
                              z_loss_coef=options.z_loss_coef, routing_impl=options.routing_impl, **common)
    if not num_experts % ep_size == 0:
        raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
    layer = MoE(hidden_size, expert, noisy_gate_policy="Jitter" if router.input_jitter else None, **common)
    layer.deepspeed_moe.gate = BaselineGate.from_topk_gate(layer.deepspeed_moe.gate, options.balance_coef,
                                                           options.balance)
    return layer


def moe_gates(model: nn.Module) -> List[Union[SparseMixerGate, BaselineGate]]:
    """The gates of ``model``'s MoE layers that keep terms and statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, (SparseMixerGate, BaselineGate))]
