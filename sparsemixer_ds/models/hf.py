"""Hugging Face MoE models as a model family (``model.family: hf``): PhiMoE (GRIN's architecture),
Mixtral and Qwen3-MoE, built from a config in the run config, trained with SparseMixer routers under
DeepSpeed's AutoEP (sparsemixer_ds.models.autoep).

The run config names the model in ``model.hf`` (the HF config inline: ``model_type`` and its fields)
or ``model.hf_config`` (a local ``config.json``, or a directory holding one). The data set the
vocabulary, as for the native family; ``max_position_embeddings`` defaults to ``model.seq_len``. The
HF config is the one source of the architecture: experts, top_k and expert width come from it, and
the ``moe`` section's values for those are not used. The ``moe`` section chooses the router (a
SparseMixer estimator), the balance loss (``balance``, ``balance_coef``), the z-loss and ``ep_size``
(AutoEP's ``autoep_size``). SparseMixer's jitter mask is ``moe.jitter_eps``, except for PhiMoE, whose
config carries it (``router_jitter_noise``, and ``input_jitter_noise``) as GRIN trained it.

A built model is the HF ``*ForCausalLM`` class with ``HFLanguageModel`` mixed in: every module keeps
its HF name (AutoEP's patterns match, checkpoints name parameters as HF does), and ``forward(tokens,
targets)`` returns the trainer's ``LMOutput``. ``train.activation_checkpointing`` turns on HF's own
gradient checkpointing of each decoder layer (the routers' ``l_aux``, computed inside a checkpointed
layer, keeps its gradient: non-reentrant checkpointing records the autograd graph as usual).
"""
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RunConfig
from ..routing.core import RoutingStats, sum_terms
from ..routing.registry import ROUTERS
from . import autoep
from .native import LMOutput

__all__ = ["MODEL_TYPES", "TRANSFORMERS_RANGE", "TRANSFORMERS_BROKEN", "check_transformers", "hf_config", "expert_parallel", "options",
           "build", "HFLanguageModel"]

# What AutoEP needs to find each architecture's MoE blocks: its preset, or for PhiMoE (no preset in
# DeepSpeed 0.19) the custom-preset keys that describe its blocks (router "router" [E, M]; fused
# experts gate_up_proj [E, 2I, M] and down_proj [E, M, I]).
MODEL_TYPES: Dict[str, Dict[str, Any]] = {
    "phimoe": {"moe_layer_pattern": r"model\.layers\.\d+\.mlp", "router_pattern": "router",
               "expert_pattern": "experts", "expert_w1": "gate_up_proj", "expert_w2": "down_proj",
               "expert_w3": None, "num_experts_attr": "num_local_experts", "top_k_attr": "num_experts_per_tok",
               "score_func": "softmax"},
    "mixtral": {"preset_model": "mixtral"},
    "qwen3_moe": {"preset_model": "qwen3_moe"},
}

# transformers releases whose MoE blocks DeepSpeed 0.19's AutoEP replaces, found by trying every 5.x minor (and
# every patch of 5.22): 4.57 keeps experts in module lists the presets do not read; from 5.23 on the output
# recorders' registry changed its get() and AutoEP's Mixtral and Qwen3-MoE presets fail inside initialize; 5.4.0's
# PhimoeConfig refuses tie_word_embeddings as a bool (its own bug, fixed in 5.5).
TRANSFORMERS_RANGE = ("5.0.0", "5.23.0")  # [lowest, first that fails)
TRANSFORMERS_BROKEN = ("5.4.0",)


def _version(text: str):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def check_transformers() -> None:
    """Refuse a transformers release that AutoEP (DeepSpeed 0.19) cannot work with, naming both."""
    import deepspeed
    import transformers
    low, high = TRANSFORMERS_RANGE
    version = _version(transformers.__version__)
    if not _version(low) <= version < _version(high) or version in map(_version, TRANSFORMERS_BROKEN):
        raise ConfigError(f"model.family hf: transformers {transformers.__version__} does not work with DeepSpeed "
                          f"{deepspeed.__version__}'s AutoEP, which needs transformers >= {low}, < {high}, not "
                          f"{', '.join(TRANSFORMERS_BROKEN)}; install one: pip install 'transformers>={low},<{high},"
                          f"{','.join('!=' + v for v in TRANSFORMERS_BROKEN)}'")


def _fields(cfg: RunConfig) -> Dict[str, Any]:
    """The HF config's fields as the run config gives them (inline, or from the config.json)."""
    m = cfg.model
    if bool(m.hf) == bool(m.hf_config):
        raise ConfigError("model.family hf needs the Hugging Face config in exactly one of model.hf (inline: "
                          "model_type and its fields) and model.hf_config (a config.json path); got "
                          f"{'both' if m.hf else 'neither'}")
    if m.hf:
        return dict(m.hf)
    path = Path(m.hf_config)
    path = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.hf_config: {path} does not exist; give a config.json or a directory holding "
                          "one (a Hugging Face checkpoint directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"model.hf_config: {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"model.hf_config: {path} must hold a JSON object (a Hugging Face config)")
    return values


def hf_config(cfg: RunConfig):
    """The transformers config of the run's model, checked: a supported MoE type, the data's
    vocabulary, a context of at least model.seq_len, a router that takes its top_k."""
    check_transformers()
    from transformers import AutoConfig

    values = _fields(cfg)
    model_type = values.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model.hf model_type must be one of {', '.join(MODEL_TYPES)} (the MoE families that "
                          f"route with SparseMixer under AutoEP here); got {model_type!r}")
    vocab = cfg.model.vocab_size
    if vocab and values.get("vocab_size", vocab) != vocab:
        raise ConfigError(f"model.hf vocab_size={values['vocab_size']} but the data's vocabulary is {vocab}; remove "
                          "vocab_size from the HF config (the data sets it) or prepare the data with that vocabulary")
    for key in ("output_router_logits", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype"):
        values.pop(key, None)  # the trainer's, or meaningless for a model built here
    values.setdefault("max_position_embeddings", cfg.model.seq_len)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.hf: transformers refuses this {model_type} config ({err})") from None
    if vocab:
        config.vocab_size = vocab
    config.output_router_logits = False  # the balance loss is SparseMixer's, from its own routes
    if config.max_position_embeddings < cfg.model.seq_len:
        raise ConfigError(f"model.hf max_position_embeddings={config.max_position_embeddings} is below "
                          f"model.seq_len={cfg.model.seq_len}; raise it or lower model.seq_len")
    router = ROUTERS[cfg.moe.router]
    if router.baseline:
        raise ConfigError(f"model.family hf routes with SparseMixer; moe.router={cfg.moe.router!r} is one of "
                          "DeepSpeed's TopKGate baselines, which AutoEP layers do not have; choose one of "
                          f"{', '.join(n for n, r in ROUTERS.items() if not r.baseline)}")
    top_k = config.num_experts_per_tok
    if top_k not in router.top_k:
        raise ConfigError(f"model.hf num_experts_per_tok={top_k} does not fit moe.router={cfg.moe.router!r}, which "
                          f"takes top_k in {list(router.top_k)}; change one of them")
    experts = num_experts(config)
    if experts % cfg.moe.ep_size:
        raise ConfigError(f"the model's {experts} experts per layer are not divisible by moe.ep_size="
                          f"{cfg.moe.ep_size}; choose an ep_size that divides {experts}")
    return config


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def expert_parallel(cfg: RunConfig, config, ds: dict, source: str) -> dict:
    """The DS JSON's ``expert_parallel`` section for this run: the JSON's own settings (grouped
    GEMM, communication) plus what the family sets (enabled, autoep_size = moe.ep_size, how AutoEP
    finds the blocks). A JSON value that contradicts the family's is refused, naming both."""
    section = dict(ds.get("expert_parallel") or {})
    wanted = {"enabled": True, "autoep_size": cfg.moe.ep_size, **MODEL_TYPES[config.model_type]}
    for key, value in wanted.items():
        if key in section and section[key] != value:
            owner = "moe.ep_size" if key == "autoep_size" else f"model type {config.model_type}"
            raise ConfigError(f"{source}: expert_parallel.{key}={section[key]!r}, but {owner} needs {value!r}; "
                              "remove it from the JSON (the run config sets it)")
    section.update(wanted)
    return section


def options(cfg: RunConfig, config) -> Dict[str, Any]:
    """The run's router options for ``use_sparsemixer``, less those the HF config sets under its own names
    (use_sparsemixer reads them there): the input jitter, and PhiMoE's jitter mask."""
    options = dataclasses.asdict(cfg.moe.router_options())
    del options["input_jitter"]
    if config.model_type == "phimoe":
        del options["jitter_eps"]
    return options


class HFLanguageModel:
    """Mixed into a transformers ``*ForCausalLM`` class: the trainer's model contract on top of HF's."""

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor = None) -> LMOutput:
        logits = super().forward(input_ids=tokens, use_cache=False).logits  # (B, T, V)
        if targets is None:
            return LMOutput(logits)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        balance, z = sum_terms([r.terms for r in autoep.routers(self)])
        return LMOutput(logits, ce + autoep.aux_loss(self), ce.detach(), balance, z)

    def routing_stats(self) -> List[RoutingStats]:
        """Each MoE layer's routing statistics, in layer order; after deepspeed.initialize."""
        autoep.install_routers(self)
        return [r.stats for r in autoep.routers(self)]


@functools.lru_cache(maxsize=None)
def _language_model_class(base: type) -> type:
    return type(f"SparseMixer{base.__name__}", (HFLanguageModel, base), {})


def build(cfg: RunConfig, ds: dict, source: str) -> nn.Module:
    """The run's HF model with SparseMixer planned into the MoE blocks AutoEP will replace; pass
    it, with ``ds`` (holding ``expert_parallel(...)``), to deepspeed.initialize."""
    from transformers import AutoModelForCausalLM

    config = hf_config(cfg)
    model = AutoModelForCausalLM.from_config(config)
    # The same object and modules, one class further down: HF's names and hooks stay as they were.
    model.__class__ = _language_model_class(type(model))
    autoep.use_sparsemixer(model, ds, source, **options(cfg, config))
    if cfg.train.activation_checkpointing:
        # HF's checkpoint of each decoder layer, which holds the MoE block AutoEP puts in later; non-reentrant,
        # with the RNG state restored for the recompute, so the SparseMixer router draws the same routes.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
