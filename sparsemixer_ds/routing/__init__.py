"""Routing: what a router is (registry: estimator rules, routers, options), the estimator (estimator), the
auxiliary losses (balance) and the router contract both MoE paths adapt to (core).

    registry.py   plain data, no torch: EstimatorRule/ESTIMATORS, ROUTERS, RouterOptions and its check
    estimator.py  SparseMixer's estimator in PyTorch: sparsemixer(), route(), eager and fused
    balance.py    Switch's balance loss (local or global) and ST-MoE's z-loss
    core.py       logits -> routes, weights, counts, l_aux, terms; routing statistics

The names below load on first use, so that ``import sparsemixer_ds.routing.registry`` (what reading a run
config needs) costs no torch import.
"""
import importlib

_PUBLIC = {"sparsemixer": "estimator", "route": "estimator", "RouterOptions": "registry", "ESTIMATORS": "registry",
           "ROUTERS": "registry", "sparsemixer_routes": "core"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
