"""sparsemixer_ds: expert-parallel MoE pre-training on DeepSpeed with SparseMixer routing.

The public names load on first use: ``import sparsemixer_ds`` (and every command that only reads a config)
pays for neither torch nor DeepSpeed until one of them is asked for.

import importlib

Layout (each folder's __init__ lists its modules):

    routing/   what a router is, the estimator, the auxiliary losses, the router contract (torch only)
    models/    the model families: native (DeepSpeed's MoE layer + SparseMixerGate), hf (AutoEP + SparseMixerRouter),
               their checkpoints and exports, and what a model costs
    data/      corpus -> prepared token files -> the loader
    run/       what a run is made of: its directory, lock, stop and watchdog, process group, metrics, optimizer
    config.py, train.py, plan.py, export.py, cli.py, testing.py
"""
import importlib

_PUBLIC = {"sparsemixer": ".routing.estimator", "SparseMixerGate": ".models.moe", "SparseMixerMoE": ".models.moe",
           "convert": ".models.moe", "use_sparsemixer": ".models.autoep"}
_MODULES = {"autoep": ".models.autoep"}  # ``from sparsemixer_ds import autoep``, as the README shows it

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(_MODULES[name], __name__)
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
