"""Model families: what the trainer needs of a model, and the one function that gives it one.

The trainer, the exporter and the convergence study know a model only through ``ModelFamily``,
chosen by the run config's ``model.family``. A family says, before any model exists:

- ``shape_keys``: the run-config keys that fix the shapes of the weights; a checkpoint resumes only
  into a run with the same values;
- ``ds_config(cfg, ds, source)``: what it needs of the DeepSpeed JSON: it refuses settings it cannot
  run (a ConfigError naming ``source``) and returns the keys to add;
- ``experts_per_layer(cfg)``: E, for what a launch reports;
- ``check_resume(checkpoint, saved, cfg, ds, world)``: refuses a resume of the checkpoint directory
  (saved by a run with config ``saved``) onto a layout its family cannot load it on;
- ``memory_estimate(cfg, ds, world) -> MemoryEstimate``: the training state one rank holds (weights,
  gradients, AdamW state), for the pre-flight check that the model fits (``training_state`` does the
  arithmetic from parameter counts);
- ``cost(cfg) -> ModelCost`` (sparsemixer_ds.models.flops): parameters (total, active per token) and training
  FLOPs per token, from the config alone, for MFU and ``sparsemixer-ds plan``;
- ``check_routing(cfg, device)``: refuses a routing implementation this device cannot run;
- ``check_init_from(cfg, path, resume) -> InitSource``: whether the run can start from the checkpoint
  directory ``path`` (--init-from), before any work, and ``load_init_weights(model, source)`` then
  copies its weights into the built model;

and it builds the model, ``build(cfg)``: an ``nn.Module`` with

- ``forward(tokens, targets=None) -> LMOutput`` (sparsemixer_ds.models.native): logits, and with targets the
  training loss with each MoE term already weighted by its own coefficient, plus the detached terms
  that are logged (cross-entropy, balance loss, z-loss);
- ``routing_stats() -> List[RoutingStats]``: per MoE layer, the statistics its gate records;

and exports it: ``export_state(model)`` is the dict of tensors an export file holds, and
``load_export_state(model, tensors)`` puts them back into a model built from the same config.

Families: ``native``, this project's decoder LM on DeepSpeed's MoE layer (sparsemixer_ds.models.native);
``hf``, a Hugging Face MoE model (PhiMoE, Mixtral, Qwen3-MoE) whose MoE blocks DeepSpeed's AutoEP
replaces, routed by SparseMixer (sparsemixer_ds.models.hf, sparsemixer_ds.models.autoep).
"""
from pathlib import Path
from typing import Dict, List, NamedTuple, Protocol, Tuple

import torch
from deepspeed.moe.utils import is_moe_param
from torch import nn

from ..config import ConfigError, DSSettings, RunConfig
from ..routing.core import RoutingStats
from ..routing.estimator import check_impl
from .flops import ModelCost, hf_cost, native_cost
from .native import LMOutput, MoELM

__all__ = ["ModelFamily", "LanguageModel", "MemoryEstimate", "InitSource", "training_state", "FAMILIES",
           "get_family"]


class InitSource(NamedTuple):
    """A checked --init-from directory."""
    path: str  # absolute
    notes: tuple  # fields that differ without changing a shape (the run's values apply)


class LanguageModel(Protocol):
    """What the trainer calls on a built model (besides what every nn.Module has)."""

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor = None) -> LMOutput:
        ...

    def routing_stats(self) -> List[RoutingStats]:
        ...


class MemoryEstimate(NamedTuple):
    """The training state one rank holds, in bytes; activations and buffers are not counted."""
    params: int  # parameters on the rank: the replicated ones plus its share of the experts
    expert_params: int  # of which in its experts (num_experts / ep_size per MoE layer)
    zero_stage: int
    weights: int
    gradients: int
    optimizer: int  # AdamW's two moments, and the fp32 master weights DeepSpeed keeps beside them

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def training_state(dense: int, expert: int, ds: dict, world: int, ep_size: int) -> MemoryEstimate:
    """Roughly what DeepSpeed holds per rank for ``dense`` replicated parameters and ``expert`` parameters
    of this rank's experts, trained with AdamW under the DS JSON ``ds`` on ``world`` ranks.

    Weights and gradients take 2 bytes per parameter with bf16/fp16, else 4; AdamW's moments take 8,
    plus 4 for an fp32 master copy (mixed precision, or any ZeRO stage: its optimizer works on an fp32
    copy of its partition). ZeRO divides the optimizer state (stage >= 1) and the gradients (stage 2)
    over the data-parallel ranks: all ``world`` ranks for the dense parameters, ``world / ep_size``
    for the experts (each expert lives on that many ranks).
    """
    settings = DSSettings.of(ds)
    mixed, stage = settings.mixed, settings.zero_stage
    width = 2 if mixed else 4
    adam = 8 + (4 if mixed or stage >= 1 else 0)

    def per_rank(stage_from: int) -> float:  # parameters whose state is divided from this ZeRO stage on
        if stage < stage_from:
            return dense + expert
        return dense / world + expert / (world // ep_size)

    return MemoryEstimate(dense + expert, expert, stage, int(width * per_rank(3)), int(width * per_rank(2)),
                          int(adam * per_rank(1)))


class ModelFamily(Protocol):
    name: str
    shape_keys: Tuple[str, ...]

    def build(self, cfg: RunConfig) -> LanguageModel:
        ...

    def ds_config(self, cfg: RunConfig, ds: dict, source: str) -> dict:
        ...

    def experts_per_layer(self, cfg: RunConfig) -> int:
        ...

    def memory_estimate(self, cfg: RunConfig, ds: dict, world: int) -> MemoryEstimate:
        ...

    def cost(self, cfg: RunConfig) -> ModelCost:
        ...

    def check_resume(self, checkpoint: Path, saved: RunConfig, cfg: RunConfig, ds: dict, world: int) -> None:
        ...

    def check_routing(self, cfg: RunConfig, device: torch.device) -> None:
        ...

    def check_init_from(self, cfg: RunConfig, path: str, resume) -> InitSource:
        ...

    def load_init_weights(self, model: nn.Module, source: InitSource) -> None:
        ...

    def export_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        ...

    def load_export_state(self, model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
        ...


class _Family:
    """What both families do alike: the routing check, the --init-from policy, exports of the state dict."""
    name: str

    def check_routing(self, cfg: RunConfig, device: torch.device) -> None:
        try:
            check_impl(cfg.moe.routing_impl, device)
        except ValueError as err:
            raise ConfigError(f"moe.{err}") from None

    def check_init_from(self, cfg: RunConfig, path: str, resume) -> InitSource:
        if resume:
            raise ConfigError(f"--init-from {path} starts a new run from a Hugging Face checkpoint and --resume "
                              "continues run_dir's own checkpoints; pass only one of them (a run started with "
                              "--init-from resumes with --resume alone)")
        return self._init_source(cfg, Path(path))

    def _init_source(self, cfg: RunConfig, path: Path) -> InitSource:
        raise ConfigError(f"--init-from {path}: model.family is {cfg.model.family!r}; only model.family hf runs start "
                          "from a Hugging Face checkpoint (set model.family: hf and model.hf_config to the directory)")

    def load_init_weights(self, model: nn.Module, source: InitSource) -> None:
        raise ConfigError(f"--init-from: model.family {self.name} does not start from a checkpoint")

    def export_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    def load_export_state(self, model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors)


class NativeFamily(_Family):
    """This project's decoder LM (sparsemixer_ds.models.native.MoELM) with DeepSpeed's MoE layers."""
    name = "native"
    shape_keys = ("model.family", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                  "model.seq_len", "model.positions", "model.ffn_hidden", "moe.router", "moe.num_experts",
                  "moe.moe_every", "moe.expert_hidden")

    def build(self, cfg: RunConfig) -> MoELM:
        return MoELM(cfg.model, cfg.moe, checkpoint_blocks=cfg.train.activation_checkpointing)

    def experts_per_layer(self, cfg: RunConfig) -> int:
        return cfg.moe.num_experts

    def ds_config(self, cfg: RunConfig, ds: dict, source: str) -> dict:
        stage = DSSettings.of(ds).zero_stage
        if stage not in (0, 1, 2):
            raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; DeepSpeed's MoE layers work with ZeRO "
                              "stages 0, 1 and 2 only")
        return {}

    def memory_estimate(self, cfg: RunConfig, ds: dict, world: int) -> MemoryEstimate:
        """The model built on the meta device (no memory, no initialisation), its parameters counted:
        DeepSpeed's MoE layer builds only this rank's num_experts / ep_size experts."""
        with torch.device("meta"):
            model = self.build(cfg)
        expert = sum(p.numel() for p in model.parameters() if is_moe_param(p))
        dense = sum(p.numel() for p in model.parameters()) - expert
        return training_state(dense, expert, ds, world, cfg.moe.ep_size)

    def cost(self, cfg: RunConfig) -> ModelCost:
        return native_cost(cfg)

    def check_resume(self, checkpoint: Path, saved: RunConfig, cfg: RunConfig, ds: dict, world: int) -> None:
        """DeepSpeed's MoE checkpoints (ZeRO 0-2, each expert in a file of its own) load onto any layout."""


class HFFamily(_Family):
    """A Hugging Face MoE model under AutoEP with SparseMixer routers (sparsemixer_ds.models.hf)."""
    name = "hf"
    # The HF config fixes every weight's shape; the router adds omega (midpoint) or not.
    shape_keys = ("model.family", "model.vocab_size", "model.hf", "model.hf_config", "moe.router")

    def build(self, cfg: RunConfig) -> nn.Module:
        from . import hf
        config = hf.hf_config(cfg)
        return hf.build(cfg, {"expert_parallel": hf.expert_parallel(cfg, config, {}, "the run config")},
                        "the run config")

    def experts_per_layer(self, cfg: RunConfig) -> int:
        from . import hf
        return hf.num_experts(hf.hf_config(cfg))

    def ds_config(self, cfg: RunConfig, ds: dict, source: str) -> dict:
        """The expert_parallel section AutoEP needs, checked against the model (built on the meta
        device) as deepspeed.initialize will see it: a setting that would change SparseMixer's
        gradient is refused here, before any rank starts."""
        from . import autoep, hf
        config = hf.hf_config(cfg)
        section = hf.expert_parallel(cfg, config, ds, source)
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        try:
            autoep.use_sparsemixer(model, {"expert_parallel": section}, source, **hf.options(cfg, config))
        except autoep.AutoEPError as err:
            raise ConfigError(str(err)) from None
        if not cfg.train.compile:
            return {"expert_parallel": section}
        # train.compile: DeepSpeed compiles each decoder layer around its AutoEP layer, which stays eager
        # (the whole model does not compile: on the CPU, torch._grouped_mm's fake kernel takes only bf16).
        return {"expert_parallel": section, "compile": {**ds.get("compile", {}), "autoep_non_moe": True}}

    def check_resume(self, checkpoint: Path, saved: RunConfig, cfg: RunConfig, ds: dict, world: int) -> None:
        """A ZeRO-3 checkpoint holds each rank's partition (zero_pp_rank_R_mp_rank_00_model_states.pt), and
        DeepSpeed 0.19 loads an AutoEP one only onto the same ranks and ep_size, under ZeRO-3 again: refused
        here, before any rank starts, rather than by every rank after it has built the model. Checkpoints
        saved under ZeRO 0-2 (each expert in a file of its own) resume onto any layout."""
        partitions = len(list(checkpoint.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))
        stage = DSSettings.of(ds).zero_stage
        if not partitions:
            if stage == 3:
                raise ConfigError(f"--resume: {checkpoint.name} was saved under ZeRO stage 0-2, and DeepSpeed's AutoEP "
                                  "cannot load it into a ZeRO-3 engine; resume with the run's ZeRO stage (its "
                                  "ds_config.json), then start a ZeRO-3 run from an export (--init-from)")
            return
        layout = (partitions, saved.moe.ep_size, 3)
        if (world, cfg.moe.ep_size, stage) != layout:
            raise ConfigError(f"--resume: {checkpoint.name} was saved under ZeRO-3 by {partitions} ranks with "
                              f"moe.ep_size={saved.moe.ep_size}, and DeepSpeed's AutoEP loads a ZeRO-3 checkpoint "
                              f"only onto that layout (now: {world} ranks, moe.ep_size={cfg.moe.ep_size}, ZeRO stage "
                              f"{stage}); resume with {partitions} ranks, moe.ep_size={saved.moe.ep_size} and ZeRO-3. "
                              "Checkpoints saved under ZeRO 0-2 resume onto any layout")

    def memory_estimate(self, cfg: RunConfig, ds: dict, world: int) -> MemoryEstimate:
        """Parameters counted on the meta device; AutoEP keeps num_experts / ep_size experts per rank."""
        from transformers import AutoModelForCausalLM

        from . import hf
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf.hf_config(cfg))
        total = sum(p.numel() for p in model.parameters())
        expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        return training_state(total - expert, expert // cfg.moe.ep_size, ds, world, cfg.moe.ep_size)

    def cost(self, cfg: RunConfig) -> ModelCost:
        from . import hf
        return hf_cost(cfg, hf.hf_config(cfg))

    def _init_source(self, cfg: RunConfig, path: Path) -> InitSource:
        from .hf_checkpoint import init_source
        return init_source(cfg, path)

    def load_init_weights(self, model: nn.Module, source: InitSource) -> None:
        from .hf_checkpoint import load_init_weights
        load_init_weights(model, source)


FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (NativeFamily(), HFFamily())}


def get_family(cfg: RunConfig) -> ModelFamily:
    """The family ``cfg.model.family`` names, or a ConfigError that lists the families."""
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}; got {cfg.model.family!r}")
    return FAMILIES[cfg.model.family]
