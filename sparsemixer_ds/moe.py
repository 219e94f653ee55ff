"""SparseMixer as a DeepSpeed MoE gate and layer: the only module that touches deepspeed.moe.

Shape legend: S tokens, E experts, K routes per token, C capacity (slots per expert), M model dim.

DeepSpeed's engine finds MoE layers by ``isinstance(m, deepspeed.moe.layer.MoE)`` and gates by
``isinstance(m, TopKGate)``, and its MOELayer does the all-to-all dispatch over the expert-parallel
group. So SparseMixer subclasses both and only replaces the routing decision: everything else
(expert placement, checkpoints per expert, parameter groups) stays DeepSpeed's.
"""
import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TOPK_GATE_TIMER, TopKGate
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from .routing import ESTIMATORS, sparsemixer

__all__ = ["SparseMixerGate", "SparseMixerMoE", "convert", "Routes", "make_moe", "RouterMonitor", "optimizer_param_groups"]


class Routes(NamedTuple):
    """One gate call's routing, in the sparse layout DeepSpeed's MOELayer dispatches."""
    l_aux: torch.Tensor  # scalar: balance loss (+ z-loss if asked for), without its model coefficient
    capacity: torch.Tensor  # int64 scalar: slots per expert, C
    num_experts: int  # E
    indices_KS: torch.Tensor  # int32 [K, S]: expert of each route, -1 where dropped
    locations_KS: torch.Tensor  # int32 [K, S]: slot of each route in its expert's buffer
    gates_KS: torch.Tensor  # float32 [K, S]: SparseMixer weight of each route, 0 where dropped
    exp_counts: torch.Tensor  # int64 [E]: routes each expert was chosen for, before capacity


def _check_gate_options(num_experts: int, k: int, capacity_factor: float, eval_capacity_factor: float,
                        min_capacity: int, noisy_gate_policy: Optional[str], top2_2nd_expert_sampling: bool,
                        jitter_eps: float, estimator: str, z_loss_coef: float) -> None:
    """Reject options SparseMixer cannot honour, before any module is built."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in 1..num_experts={num_experts}; got {k!r}")
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
    if not isinstance(jitter_eps, (int, float)) or not 0 <= float(jitter_eps) < math.inf:
        raise ValueError(f"jitter_eps must be a finite number >= 0 (the paper uses 0.1); got {jitter_eps!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}; got {estimator!r}")
    if not isinstance(z_loss_coef, (int, float)) or not 0 <= float(z_loss_coef) < math.inf:
        raise ValueError(f"z_loss_coef must be a finite number >= 0 (ST-MoE uses 1e-3); got {z_loss_coef!r}")


class SparseMixerGate(TopKGate):
    """A DeepSpeed gate whose routes and weights come from ``sparsemixer``.

    Takes TopKGate's constructor arguments plus ``jitter_eps``, ``estimator`` and ``z_loss_coef``.
    ``noisy_gate_policy`` must stay None (SparseMixer samples its routes) and
    ``top2_2nd_expert_sampling`` True. Capacity follows DeepSpeed: C = max(ceil(S / E * factor * k),
    min_capacity) slots per expert, or with ``drop_tokens=False`` the largest expert load over the
    expert-parallel group. Earlier rounds claim slots first; within a round, tokens claim them in
    order, or in a random order with ``use_rts`` (random token selection).
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
                 z_loss_coef: float = 0.0) -> None:
        _check_gate_options(num_experts, k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy,
                            top2_2nd_expert_sampling, jitter_eps, estimator, z_loss_coef)
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity, None,
                         drop_tokens, use_rts, ep_group, True)
        self.num_experts = num_experts
        self.jitter_eps = float(jitter_eps)
        self.estimator = estimator
        self.z_loss_coef = float(z_loss_coef)

    @classmethod
    def from_topk_gate(cls, gate: TopKGate, **sparsemixer_kwargs) -> "SparseMixerGate":
        """A SparseMixer gate that keeps ``gate``'s router weights, capacity settings and EP group."""
        new = cls(gate.wg.in_features, gate.wg.out_features, gate.k, gate.capacity_factor, gate.eval_capacity_factor,
                  gate.min_capacity, None, gate.drop_tokens, gate.use_rts, gate.ep_group, True, **sparsemixer_kwargs)
        new.wg = gate.wg  # the same Parameter object: trained weights and device/dtype are kept
        new.wall_clock_breakdown = gate.wall_clock_breakdown
        return new

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, k={self.k}, estimator={self.estimator!r}, "
                f"jitter_eps={self.jitter_eps}, capacity_factor={self.capacity_factor}, "
                f"drop_tokens={self.drop_tokens}, z_loss_coef={self.z_loss_coef}")

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
        experts_SK, weights_SK = sparsemixer(logits_SE, self.k, self.jitter_eps, self.training, self.estimator)
        routes = self._dispatch_routes(logits_SE, experts_SK, weights_SK, used_token)
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

    def _dispatch_routes(self, logits_SE: torch.Tensor, experts_SK: torch.Tensor, weights_SK: torch.Tensor,
                         used_token: Optional[torch.Tensor]) -> Routes:
        num_tokens, num_experts = logits_SE.shape
        device = logits_SE.device
        experts_KS = experts_SK.t()
        routed_KS = torch.ones_like(experts_KS, dtype=torch.bool)
        if used_token is not None:
            routed_KS = routed_KS & (used_token.reshape(1, num_tokens) != 0)
        # Unrouted tokens go to a virtual expert E: counted nowhere, sorted last.
        bucket_N = torch.where(routed_KS, experts_KS, num_experts).reshape(-1)  # N = K * S routes
        exp_counts = torch.bincount(bucket_N, minlength=num_experts + 1)[:num_experts]
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

        # Switch Transformer eq. 4: E * sum_e (mean router probability) * (fraction of routes).
        probs_SE = torch.softmax(logits_SE, dim=1)
        route_fraction_E = exp_counts.float() / (num_tokens * self.k)
        l_aux = num_experts * torch.sum(probs_SE.mean(dim=0) * route_fraction_E)
        if self.z_loss_coef > 0:  # ST-MoE eq. 5: keeps router logits small for bf16 stability
            l_aux = l_aux + self.z_loss_coef * torch.logsumexp(logits_SE, dim=1).square().mean()

        return Routes(l_aux=l_aux,
                      capacity=capacity,
                      num_experts=num_experts,
                      indices_KS=torch.where(kept_KS, experts_KS, -1).to(torch.int32),
                      locations_KS=torch.where(kept_KS, locations_KS, 0).to(torch.int32),
                      gates_KS=weights_SK.t() * kept_KS,
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


class SparseMixerMoE(MoE):
    """DeepSpeed's MoE layer with a SparseMixerGate; returns ``(output, l_aux, exp_counts)``.

    Takes MoE's constructor arguments plus ``jitter_eps``, ``estimator`` and ``z_loss_coef``. With
    the midpoint estimator (and its midpoint-all ablation) it owns SparseMixer's per-channel output scale ``omega`` [M]
    (initialised to ones, trained, a non-expert parameter), applied to the experts' combined output.
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
                 z_loss_coef: float = 0.0) -> None:
        if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}: each rank of an "
                             "expert-parallel group holds num_experts / ep_size experts")
        # The gate checks every routing option before DeepSpeed builds (and copies) the experts.
        gate = SparseMixerGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                               noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                               jitter_eps=jitter_eps, estimator=estimator, z_loss_coef=z_loss_coef)
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, None, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, True)
        self._install_gate(gate)

    def _install_gate(self, gate: SparseMixerGate) -> None:
        """Swap ``gate`` into the MOELayer and add omega where the estimator has one."""
        self.deepspeed_moe.gate = gate
        weight = gate.wg.weight
        omega = None
        if gate.estimator.startswith("midpoint"):
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
    ``jitter_eps``, ``estimator`` and ``z_loss_coef``. A layer's ``noisy_gate_policy`` is dropped:
    SparseMixer's sampling replaces input jitter. Returns how many layers were converted.
    """
    unknown = set(sparsemixer_kwargs) - {"jitter_eps", "estimator", "z_loss_coef"}
    if unknown:
        raise TypeError(f"convert() got unknown options {sorted(unknown)}; it takes jitter_eps, estimator, z_loss_coef")
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


# SparseMixer routers by name -> their estimator (sparsemixer_ds.routing.ESTIMATORS).
ROUTER_ESTIMATORS = {"sparsemixer": "midpoint", "sparsemixer-v2": "heun3", "sampled": "sampled", "euler": "euler",
                     "midpoint-all": "midpoint-all"}


def make_moe(router: str,
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
             jitter_eps: float = 0.1,
             z_loss_coef: float = 0.0) -> MoE:
    """An MoE layer for a router name, so that comparing routers is one config change.

    ``sparsemixer`` (midpoint) and ``sparsemixer-v2`` (heun3) are SparseMixerMoE, as are the
    estimator ablations named after their estimator; ``switch`` is DeepSpeed's TopKGate with k=1
    and input jitter, ``gshard`` its TopKGate with k=2.
    """
    common = dict(num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
                  eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity, drop_tokens=drop_tokens)
    if router in ROUTER_ESTIMATORS:
        return SparseMixerMoE(hidden_size, expert, jitter_eps=jitter_eps, estimator=ROUTER_ESTIMATORS[router],
                              z_loss_coef=z_loss_coef, **common)
    if router in ("switch", "gshard"):
        if not num_experts % ep_size == 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        return MoE(hidden_size, expert, noisy_gate_policy="Jitter" if router == "switch" else None, **common)
    raise ValueError(f"router must be one of {', '.join([*ROUTER_ESTIMATORS, 'switch', 'gshard'])}; got {router!r}")


class RouterMonitor:
    """Routing statistics of every gate in a model, for metrics; one forward hook per gate.

    While ``active``, each gate call adds, per MoE layer: the load fraction of every expert (routes
    before capacity over all routes), the dropped-route fraction, and the mean entropy of the
    router's softmax (nats). ``collect()`` returns the sums and call counts as one flat float64
    tensor per layer, ready for an all-reduce, and starts over.
    """

    def __init__(self, model: nn.Module) -> None:
        self.gates = [m for m in model.modules() if isinstance(m, TopKGate)]
        self.active = False
        self._sums = [None] * len(self.gates)
        self._handles = [gate.register_forward_hook(self._hook(i)) for i, gate in enumerate(self.gates)]

    def _hook(self, index: int):

        def record(gate: TopKGate, args: tuple, output: tuple) -> None:
            if not self.active:
                return
            with torch.no_grad():
                logits_SE = F.linear(args[0].float(), gate.wg.weight.float())
                log_probs_SE = torch.log_softmax(logits_SE, dim=1)
                entropy = -(log_probs_SE.exp() * log_probs_SE).sum(dim=1).mean()
                indices_KS, exp_counts = output[3], output[6]  # the sparse-routes contract
                load_E = exp_counts.double() / exp_counts.sum().clamp_min(1)
                dropped = (indices_KS < 0).double().mean()
                row = torch.cat([load_E, torch.stack([dropped, entropy.double(), torch.ones_like(dropped)])])
                self._sums[index] = row if self._sums[index] is None else self._sums[index] + row

        return record

    def collect(self) -> List[torch.Tensor]:
        """Per layer: [load_0 .. load_{E-1}, dropped, entropy, calls] summed since the last collect."""
        out = []
        for gate, sums in zip(self.gates, self._sums):
            if sums is None:
                sums = torch.zeros(gate.wg.out_features + 3, dtype=torch.float64, device=gate.wg.weight.device)
            out.append(sums)
        self._sums = [None] * len(self.gates)
        return out

    @staticmethod
    def summarize(sums: torch.Tensor) -> dict:
        """Means from ``collect()``'s sums (all-reduced or not): load, max/mean load, dropped, entropy."""
        calls = float(sums[-1].clamp_min(1))
        load = (sums[:-3] / calls).tolist()
        mean_load = 1.0 / len(load)
        return {"load": load, "max_mean_load": max(load) / mean_load, "dropped": float(sums[-3]) / calls,
                "entropy": float(sums[-2]) / calls}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: decay on matrices only (not norms, biases or omega), and expert parameters in
    groups of their own, which DeepSpeed's MoE needs to reduce them over the expert-data-parallel group."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
