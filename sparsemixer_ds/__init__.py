"""sparsemixer_ds: expert-parallel MoE pre-training on DeepSpeed with SparseMixer routing.

The public names load on first use: ``import sparsemixer_ds`` (and every command that only reads a config)
pays for neither torch nor DeepSpeed until one of them is asked for.
"""
import importlib

_PUBLIC = {"sparsemixer": ".routing.estimator", "SparseMixerGate": ".moe", "SparseMixerMoE": ".moe",
           "convert": ".moe", "use_sparsemixer": ".autoep"}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
