"""What a router is, as plain data: the estimator rules, the routers a run can name in ``moe.router``, and the
router options with their one check. Read by config validation, both MoE paths (DeepSpeed's MoE layer and
AutoEP), the cost model, the benchmarks and the tests.

Importing this module loads neither torch nor DeepSpeed: reading a run config needs only this.

A router is either a SparseMixer estimator (sparsemixer_ds.routing.estimator explains the rules) or one of
DeepSpeed's own TopKGate baselines.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = ["EstimatorRule", "ESTIMATORS", "ROUTING_IMPLS", "BALANCE_MODES", "RouterOptions", "check_top_k", "Router",
           "ROUTERS", "get_router", "main_routers"]


class EstimatorRule(NamedTuple):
    """How one estimator scales the forward value and the backward signal of p_D."""
    c_low: float  # forward scale of a draw that loses the coin
    q: float  # probability that a draw keeps full scale (c = 1)
    s: float  # factor on the router gradient d p_D / dz
    exempt_argmax: bool = True  # the argmax draw (the first of tied maxima) always keeps c = 1
    omega: bool = False  # SparseMixer's per-channel output scale omega [M] (init 1) is trained with the layer


ESTIMATORS: Dict[str, EstimatorRule] = {
    "midpoint": EstimatorRule(c_low=0.5, q=0.5, s=2.0, omega=True),
    "heun3": EstimatorRule(c_low=1.0 / 3.0, q=0.25, s=1.0),
    # Ablations (see sparsemixer_ds.routing.estimator).
    "sampled": EstimatorRule(c_low=1.0, q=1.0, s=1.0),
    "euler": EstimatorRule(c_low=1.0, q=1.0, s=2.0),
    "midpoint-all": EstimatorRule(c_low=0.5, q=0.5, s=2.0, exempt_argmax=False, omega=True),
}

# How the estimator runs: eager PyTorch ops (the reference), fused (compiled), or auto (fused where faster).
ROUTING_IMPLS = ("auto", "eager", "fused")

# The balance loss over one rank's micro-batch, or over the data-parallel group (sparsemixer_ds.routing.balance).
BALANCE_MODES = ("local", "global")


class RouterOptionError(ValueError):
    """A router option that no router can honour; the message names the option, the value and the fix."""


def _check_number(name: str, value, usual: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < math.inf:
        raise RouterOptionError(f"{name} must be a finite number >= 0 ({usual}); got {value!r}")


def _unknown_estimator(estimator) -> RouterOptionError:
    return RouterOptionError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")


def check_top_k(top_k, num_experts: int, name: str = "top_k") -> None:
    """Refuse a top_k that is not an integer in 1..num_experts."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise RouterOptionError(f"{name} must be an integer in 1..{num_experts} (the number of experts); "
                                f"got {top_k!r}")


@dataclass(frozen=True)
class RouterOptions:
    """How a router routes and what it adds to the loss: one set of options for both MoE paths (the DeepSpeed
    gate and the AutoEP router), checked by ``check()`` before anything is built. The defaults are GRIN's
    router (SparseMixer-v2) with Switch's balance coefficient."""
    estimator: Optional[str] = "heun3"  # an ESTIMATORS key; None: DeepSpeed's TopKGate (the switch/gshard baselines)
    jitter_eps: float = 0.1  # SparseMixer's jitter mask; HF PhiMoE calls it router_jitter_noise
    input_jitter: float = 0.0  # multiplicative U(1 - x, 1 + x) noise on the router's input in training
    balance_coef: float = 0.01  # weight of Switch's balance loss (0: none)
    balance: str = "local"  # local | global (sparsemixer_ds.routing.balance)
    z_loss_coef: float = 0.0  # weight of ST-MoE's router z-loss (SparseMixer routers only)
    routing_impl: str = "auto"  # auto | eager | fused: how the estimator runs (estimator.use_fused)

    @property
    def rule(self) -> EstimatorRule:
        """The estimator's rule; a RouterOptionError for an unknown estimator or a baseline's None."""
        if self.estimator not in ESTIMATORS:
            raise _unknown_estimator(self.estimator)
        return ESTIMATORS[self.estimator]

    @property
    def omega(self) -> bool:
        """Whether the layer trains SparseMixer's output scale omega [M] (the midpoint estimators)."""
        return self.estimator is not None and self.rule.omega

    def check(self) -> "RouterOptions":
        """Refuse options no router can honour, naming the option, the value and the fix; returns self."""
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise _unknown_estimator(self.estimator)
        _check_number("jitter_eps", self.jitter_eps, "the paper uses 0.1, PhiMoE 0.01")
        _check_number("input_jitter", self.input_jitter, "0: none")
        if self.input_jitter >= 1:
            raise RouterOptionError(f"input_jitter must be below 1 (it scales inputs by U(1 - x, 1 + x)); "
                                    f"got {self.input_jitter!r}")
        _check_number("balance_coef", self.balance_coef, "Switch trains with 0.01")
        _check_number("z_loss_coef", self.z_loss_coef, "ST-MoE uses 1e-3")
        if self.balance not in BALANCE_MODES:
            raise RouterOptionError(f"balance must be one of {', '.join(BALANCE_MODES)} (global: GRIN's balance over "
                                    f"all ranks); got {self.balance!r}")
        if self.routing_impl not in ROUTING_IMPLS:
            raise RouterOptionError(f"routing_impl must be one of {', '.join(ROUTING_IMPLS)}; got "
                                    f"{self.routing_impl!r} (auto: fused where it is faster)")
        if self.estimator is None and self.z_loss_coef:
            raise RouterOptionError(f"z_loss_coef={self.z_loss_coef} needs a SparseMixer router; DeepSpeed's "
                                    "TopKGate baselines have no z-loss: set it to 0")
        return self


class Router(NamedTuple):
    name: str
    top_k: Tuple[int, ...]  # the top_k values it takes; the first is its usual one
    estimator: Optional[str]  # an ESTIMATORS key; None: DeepSpeed's TopKGate
    input_jitter: bool = False  # DeepSpeed's multiplicative input jitter (Switch); TopKGate baselines only
    ablation: bool = False  # an estimator ablation, for studies rather than training
    about: str = ""

    @property
    def baseline(self) -> bool:
        """DeepSpeed's own gate, without SparseMixer's estimator (and without a z-loss)."""
        return self.estimator is None


ROUTERS: Dict[str, Router] = {r.name: r for r in (
    Router("sparsemixer", (1, ), "midpoint", about="SparseMixer, midpoint estimator (Liu et al. 2023)"),
    Router("sparsemixer-v2", (1, 2), "heun3", about="SparseMixer-v2 / GRIN, heun3 estimator (Liu et al. 2024)"),
    Router("switch", (1, ), None, input_jitter=True,
           about="DeepSpeed's TopKGate, k=1, input jitter (Fedus et al. 2021)"),
    Router("gshard", (2, ), None, about="DeepSpeed's TopKGate, k=2 (Lepikhin et al. 2020)"),
    # Ablations of the estimator (sparsemixer_ds.routing.estimator explains each).
    Router("sampled", (1, 2), "sampled", ablation=True, about="D ~ p with the plain gradient of p_D"),
    Router("euler", (1, 2), "euler", ablation=True, about="SparseMixer's first-order rule"),
    Router("midpoint-all", (1, 2), "midpoint-all", ablation=True, about="midpoint with the coin on the argmax too"),
)}


def get_router(name: str) -> Router:
    """The registered router called ``name``, or a ValueError that lists them."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}; got {name!r}")
    return ROUTERS[name]


def main_routers() -> List[Router]:
    """The routers meant for training (no ablations), in registry order: what the benchmarks compare."""
    return [r for r in ROUTERS.values() if not r.ablation]
