"""sparsemixer_ds: expert-parallel MoE pre-training on DeepSpeed with SparseMixer routing."""
from .routing import sparsemixer
from .moe import SparseMixerGate, SparseMixerMoE, convert

__all__ = ["sparsemixer", "SparseMixerGate", "SparseMixerMoE", "convert"]
__version__ = "0.1.0"
