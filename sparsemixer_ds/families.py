"""Model families: what the trainer needs of a model, and the one function that gives it one.

The trainer, the exporter and the convergence study know a model only through ``ModelFamily``,
chosen by the run config's ``model.family``. A family says, before any model exists:

- ``shape_keys``: the run-config keys that fix the shapes of the weights; a checkpoint resumes only
  into a run with the same values;
- ``ds_config(cfg, ds, source)``: what it needs of the DeepSpeed JSON: it refuses settings it cannot
  run (a ConfigError naming ``source``) and returns the keys to add;

and it builds the model, ``build(cfg)``: an ``nn.Module`` with

- ``forward(tokens, targets=None) -> LMOutput`` (sparsemixer_ds.model): logits, and with targets the
  training loss with each MoE term already weighted by its own coefficient, plus the detached terms
  that are logged (cross-entropy, balance loss, z-loss);
- ``routing_stats() -> List[RoutingStats]``: per MoE layer, the statistics its gate records;

and exports it: ``export_state(model)`` is the dict of tensors an export file holds, and
``load_export_state(model, tensors)`` puts them back into a model built from the same config.

Families: ``native``, this project's decoder LM on DeepSpeed's MoE layer (sparsemixer_ds.model).
"""
from typing import Dict, List, Protocol, Tuple

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .model import LMOutput, MoELM
from .moe import RoutingStats

__all__ = ["ModelFamily", "LanguageModel", "FAMILIES", "get_family"]


class LanguageModel(Protocol):
    """What the trainer calls on a built model (besides what every nn.Module has)."""

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor = None) -> LMOutput:
        ...

    def routing_stats(self) -> List[RoutingStats]:
        ...


class ModelFamily(Protocol):
    name: str
    shape_keys: Tuple[str, ...]

    def build(self, cfg: RunConfig) -> LanguageModel:
        ...

    def ds_config(self, cfg: RunConfig, ds: dict, source: str) -> dict:
        ...

    def export_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        ...

    def load_export_state(self, model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
        ...


class NativeFamily:
    """This project's decoder LM (sparsemixer_ds.model.MoELM) with DeepSpeed's MoE layers."""
    name = "native"
    shape_keys = ("model.family", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                  "model.seq_len", "model.positions", "model.ffn_hidden", "moe.router", "moe.num_experts",
                  "moe.moe_every", "moe.expert_hidden")

    def build(self, cfg: RunConfig) -> MoELM:
        return MoELM(cfg.model, cfg.moe)

    def ds_config(self, cfg: RunConfig, ds: dict, source: str) -> dict:
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; DeepSpeed's MoE layers work with ZeRO "
                              "stages 0, 1 and 2 only")
        return {}

    def export_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    def load_export_state(self, model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors)


FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (NativeFamily(), )}


def get_family(cfg: RunConfig) -> ModelFamily:
    """The family ``cfg.model.family`` names, or a ConfigError that lists the families."""
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}; got {cfg.model.family!r}")
    return FAMILIES[cfg.model.family]
