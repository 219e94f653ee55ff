"""The routers a run can name in ``moe.router``: one registry, read by config validation, the model
factory, the benchmarks and the tests.

A router is either a SparseMixer estimator (sparsemixer_ds.routing) inside SparseMixerGate, or one of
DeepSpeed's own TopKGate baselines. Plain data: importing this module loads neither torch nor DeepSpeed.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = ["Router", "ROUTERS", "get_router", "main_routers"]


class Router(NamedTuple):
    name: str
    top_k: Tuple[int, ...]  # the top_k values it takes; the first is its usual one
    estimator: Optional[str]  # a sparsemixer_ds.routing.ESTIMATORS key; None: DeepSpeed's TopKGate
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
    # Ablations of the estimator (sparsemixer_ds.routing explains each).
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
