"""SparseMixer routing inside DeepSpeed's AutoEP layers: the only module that touches deepspeed.module_inject.

Shape legend: T tokens, E experts, K routes per token, M model dim.

AutoEP (``"expert_parallel": {"enabled": true, ...}`` in the DeepSpeed JSON) replaces each Hugging Face
MoE block of a model with an ``AutoEPMoELayer`` inside ``deepspeed.initialize``: dropless routing,
all-to-all over the expert-parallel group, grouped GEMM, ZeRO-3. Its router is a
``TokenChoiceTopKRouter`` (softmax top-k) built there, with no hook for another. So:

    model = AutoModelForCausalLM.from_config(hf_config)           # PhiMoE, Mixtral, Qwen3-MoE, ...
    layers = use_sparsemixer(model, ds_config, estimator="heun3")  # the one added line
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    out = engine(input_ids)
    loss = cross_entropy(out.logits, targets) + aux_loss(engine.module)

``use_sparsemixer`` runs AutoEP's own detection on the model, checks every setting that would change
SparseMixer's gradient, and arranges that the first forward after ``deepspeed.initialize`` puts a
``SparseMixerRouter`` in each AutoEP layer (``install_routers`` does it at once, for callers that want
it before). The new router holds AutoEP's ``gate`` Linear itself, the same module and Parameter: the
optimizer, ZeRO (stage 3 gathers it through that module's own hooks) and checkpoints see exactly the
parameters they saw before, under the same names.

Where the estimator needs more than AutoEP's layer has:

- the midpoint estimator's per-channel output scale omega [M] is a parameter of an ``OutputScale``
  module that ``use_sparsemixer`` adds beside each MoE block (``<block>_omega``), before
  ``deepspeed.initialize``, so that it is in the optimizer, in ZeRO's partitions and in checkpoints
  like any parameter; a forward hook on the AutoEP layer multiplies the layer's output by it.
- the weights must multiply expert outputs (AutoEP's ``score_apply`` "post") and stay as the estimator
  made them (no renormalisation, no scale, no expert bias, no group-limited routing): a DeepSpeed
  JSON that asks otherwise is refused before anything is built.
- the auxiliary losses (sparsemixer_ds.routing.balance) come from the routes SparseMixer sampled; the model's
  own softmax top-k aux loss (``output_router_logits``) is refused rather than left to stand in.
- HF PhiMoE's ``input_jitter_noise`` multiplies the MoE block's input (router and experts, in place);
  AutoEP's layer has no such step. The router here jitters its own input only (the experts see the
  clean input), which is Switch's input jitter; eval, where there is no jitter, is unchanged.
"""
import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from ..routing.core import MoETerms, RoutingStats, sparsemixer_routes
from ..routing.registry import RouterOptionError, RouterOptions

__all__ = ["SparseMixerRouter", "OutputScale", "use_sparsemixer", "install_routers", "autoep_specs", "aux_loss",
           "routers", "AutoEPError"]


class AutoEPError(ValueError):
    """A model or DeepSpeed JSON that SparseMixer cannot route under AutoEP as asked."""


class SparseMixerRouter(nn.Module):
    """AutoEP's router contract (``TokenChoiceTopKRouter``) with SparseMixer's routes and weights.

    ``forward(x [T, M], expert_bias=None) -> (weights [T, K] float32, experts [T, K] int64,
    tokens_per_expert [E] int32)``. Each call also leaves ``l_aux`` (the weighted auxiliary losses,
    with their gradient), ``terms`` (the unweighted ones, detached) and, while ``stats.recording``,
    routing statistics.
    """
    score_func = "softmax"  # what AutoEP's layer reads when it returns router logits

    def __init__(self, gate: nn.Linear, top_k: int, options: RouterOptions) -> None:
        super().__init__()
        self.gate = gate  # AutoEP's own Linear (E x M): the same module, parameter and hooks
        self.num_experts = gate.out_features
        self.top_k = top_k
        self.options = options
        self.stats = RoutingStats(self.num_experts)
        self.l_aux: Optional[torch.Tensor] = None
        self.terms: Optional[MoETerms] = None

    def extra_repr(self) -> str:
        o = self.options
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, estimator={o.estimator!r}, "
                f"jitter_eps={o.jitter_eps}, input_jitter={o.input_jitter}, balance={o.balance!r}, "
                f"balance_coef={o.balance_coef}, z_loss_coef={o.z_loss_coef}, routing_impl={o.routing_impl!r}")

    def forward(self, x_TM: torch.Tensor, expert_bias: Optional[torch.Tensor] = None):
        if expert_bias is not None:
            raise AutoEPError("AutoEP passed an expert bias (load_balance_coeff) to the SparseMixer router, which "
                              "would bias its draws; remove load_balance_coeff from expert_parallel")
        o = self.options
        if self.training and o.input_jitter > 0:
            x_TM = x_TM * torch.empty_like(x_TM).uniform_(1.0 - o.input_jitter, 1.0 + o.input_jitter)
        logits_TE = self.gate(x_TM).float()
        routed = sparsemixer_routes(logits_TE, self.top_k, o, self.training)
        self.l_aux, self.terms = routed.l_aux, routed.terms
        if self.stats.recording:
            self.stats.add(logits_TE, routed.counts_E, torch.zeros((), dtype=torch.float64))
        return routed.weights_SK, routed.experts_SK, routed.counts_E.to(torch.int32)  # AutoEP counts in int32


class OutputScale(nn.Module):
    """SparseMixer's per-channel output scale omega [M] (midpoint estimator), initialised to ones.

    A module of its own so that ZeRO-3 gathers omega when it is used (a module's hooks gather the
    parameters it owns) and so that it has a name beside the MoE block it scales."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.omega = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output * self.omega


@dataclass(frozen=True)
class _Block:
    """One MoE block use_sparsemixer routes, kept for the swap after deepspeed.initialize."""
    name: str  # the block's module name, which AutoEP's layer takes over
    top_k: int
    hidden_size: int


def autoep_specs(model: nn.Module, ds_config: dict, source: str):
    """AutoEP's own detection of ``model``'s MoE blocks under the DS JSON's expert_parallel section."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    section = ds_config.get("expert_parallel") or {}
    if not section.get("enabled"):
        raise AutoEPError(f"{source}: expert_parallel.enabled is {section.get('enabled')!r}, not true, so "
                          "deepspeed.initialize would not build AutoEP layers for SparseMixer to route; add "
                          "\"expert_parallel\": {\"enabled\": true, \"autoep_size\": N, \"preset_model\": ...}")
    if section.get("score_apply") == "pre":
        raise AutoEPError(f"{source}: expert_parallel.score_apply=\"pre\" would multiply the weights into the "
                          "experts' inputs; SparseMixer's gradient needs them on the outputs: set \"post\" or "
                          "leave it unset")
    if section.get("route_norm"):
        raise AutoEPError(f"{source}: expert_parallel.route_norm=true would renormalise the weights SparseMixer's "
                          "estimator sets; leave it unset")
    if section.get("route_scale", 1.0) != 1.0:
        raise AutoEPError(f"{source}: expert_parallel.route_scale={section['route_scale']!r} would scale "
                          "SparseMixer's weights; leave it at 1")
    for key, why in (("load_balance_coeff", "adds an expert bias to the draws (SparseMixer balances with its loss)"),
                     ("num_expert_groups", "limits each draw to groups of experts (SparseMixer samples over all)")):
        if section.get(key) is not None:
            raise AutoEPError(f"{source}: expert_parallel.{key}={section[key]!r} {why}; remove it")
    _quiet_jitter_warning()
    specs = AutoEP(model, parse_autoep_config(section)).ep_parser()
    if not specs:
        raise AutoEPError(f"{source}: AutoEP finds no MoE block in {type(model).__name__} with these expert_parallel "
                          "settings; set preset_model (mixtral, qwen3_moe, ...) or the custom-preset keys")
    for spec in specs:
        apply = section.get("score_apply", "auto")
        if (spec.score_apply if apply == "auto" else apply) != "post":
            raise AutoEPError(f"{source}: AutoEP's preset {spec.model_family!r} multiplies the weights into the "
                              f"experts' inputs (score_apply \"{spec.score_apply}\"); set expert_parallel.score_apply "
                              "to \"post\": SparseMixer's gradient needs them on the outputs")
        if spec.score_func != "softmax":
            raise AutoEPError(f"{source}: AutoEP's preset {spec.model_family!r} scores experts with "
                              f"{spec.score_func!r}; SparseMixer samples from a softmax (score_func \"softmax\")")
    return specs


# RouterOptions fields that a Hugging Face config sets under its family's own name, by model_type. The
# same name means different things: PhiMoE's router_jitter_noise is SparseMixer's jitter mask (jitter_eps),
# Mixtral's multiplies the MoE block's input (PhiMoE's input_jitter_noise). Mixtral's default 0 taken as
# jitter_eps would mask every expert but the argmax: weights of 1 and no router gradient.
_HF_OPTIONS = {
    "phimoe": (("jitter_eps", "router_jitter_noise"), ("input_jitter", "input_jitter_noise")),
    "mixtral": (("input_jitter", "router_jitter_noise"),),
}


class _JitterWarning(logging.Filter):
    """Drops AutoEP's warning that its router ignores the model's ``router_jitter_noise``: the SparseMixer
    router replaces AutoEP's and applies that jitter (it is PhiMoE's jitter_eps), so the warning, once per
    layer at every start, would say the opposite of what happens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "AutoEP router does not implement jitter" not in record.getMessage()


def _quiet_jitter_warning() -> None:
    from deepspeed.utils import logger
    if not any(isinstance(f, _JitterWarning) for f in logger.filters):
        logger.addFilter(_JitterWarning())


def use_sparsemixer(model: nn.Module, ds_config: dict, source: str = "the DeepSpeed config",
                    **options) -> List[str]:
    """Make every MoE block that AutoEP will replace route with SparseMixer. Call it before
    ``deepspeed.initialize(model=model, config=ds_config, ...)``; returns the blocks' names.

    ``options``: the fields of sparsemixer_ds.routing.registry.RouterOptions (default: GRIN's router, heun3,
    with balance_coef 0.01). Those a model family's config already sets, under
    its own names (``_HF_OPTIONS``), default to the config's values; top_k is the model's own
    (``num_experts_per_tok``). Refuses, naming ``source``, a DS JSON or
    model that would change SparseMixer's gradient. Builds nothing the optimizer could miss: omega
    (midpoint) is added to the model here.
    """
    unknown = set(options) - set(RouterOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"use_sparsemixer() got unknown options {sorted(unknown)}; it takes "
                        f"{', '.join(RouterOptions.__dataclass_fields__)}")
    hf_config = getattr(model, "config", None)
    for field, hf_name in _HF_OPTIONS.get(getattr(hf_config, "model_type", None), ()):
        if field not in options and getattr(hf_config, hf_name, None) is not None:
            options[field] = float(getattr(hf_config, hf_name))
    opts = RouterOptions(**options)
    try:
        opts.check()
    except RouterOptionError as err:
        raise AutoEPError(str(err)) from None
    if opts.estimator is None:
        raise AutoEPError("estimator=None is DeepSpeed's TopKGate, which AutoEP layers do not have; choose a "
                          "SparseMixer estimator (heun3: GRIN, PhiMoE; midpoint: SparseMixer)")
    if getattr(hf_config, "output_router_logits", False):
        raise AutoEPError(f"{type(model).__name__}.config.output_router_logits is True: the model would add its "
                          "own balance loss, from a softmax top-k that SparseMixer does not take; set it to False "
                          "and add sparsemixer_ds.models.autoep.aux_loss(model) to the loss")
    if getattr(model, "_sparsemixer_blocks", None):
        raise AutoEPError(f"use_sparsemixer() was already called on this {type(model).__name__}")
    specs = autoep_specs(model, ds_config, source)
    blocks = [_Block(spec.moe_module_name, spec.top_k, spec.hidden_size) for spec in specs]
    if opts.omega:
        for entry in blocks:
            block = model.get_submodule(entry.name)
            weight = next(block.parameters())
            parent, child = _parent(model, entry.name)
            parent.add_module(f"{child}_omega", OutputScale(entry.hidden_size, weight.dtype, weight.device))
    model._sparsemixer_blocks = blocks
    model._sparsemixer_options = opts
    model.register_forward_pre_hook(_install_before_forward)
    return [entry.name for entry in blocks]


def _install_before_forward(model: nn.Module, _args) -> None:
    install_routers(model)  # nothing returned: a forward pre-hook's return value would replace the inputs


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def install_routers(model: nn.Module) -> int:
    """Put a SparseMixerRouter into each AutoEP layer that ``use_sparsemixer`` chose, after
    ``deepspeed.initialize`` (the model's first forward does it too). Returns how many it installed
    now (0 once done)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    blocks = getattr(model, "_sparsemixer_blocks", None)
    if not blocks:
        raise AutoEPError(f"{type(model).__name__} has no SparseMixer blocks: call use_sparsemixer(model, ds_config) "
                          "before deepspeed.initialize")
    opts: RouterOptions = model._sparsemixer_options
    installed = 0
    for entry in blocks:
        layer = model.get_submodule(entry.name)
        if not isinstance(layer, AutoEPMoELayer):
            raise AutoEPError(f"{entry.name} is still a {type(layer).__name__}, not an AutoEP layer: pass the model "
                              "and the same DeepSpeed config to deepspeed.initialize before its first forward")
        if isinstance(layer.router, SparseMixerRouter):
            continue
        if layer.score_apply != "post" or layer.expert_bias is not None or layer.top_k != entry.top_k:
            raise AutoEPError(f"{entry.name}: AutoEP built the layer with score_apply={layer.score_apply!r}, expert "
                              f"bias {'on' if layer.expert_bias is not None else 'off'}, top_k={layer.top_k} "
                              f"(SparseMixer needs \"post\", off, {entry.top_k}): use the DeepSpeed config given to "
                              "use_sparsemixer")
        old = layer.router
        router = SparseMixerRouter(old.gate, entry.top_k, opts)
        router.train(old.training)
        # AutoEP may alias its router under the HF name (Mixtral's "gate") for output recorders.
        for name, child in list(layer.named_children()):
            if child is old:
                setattr(layer, name, router)
        parent, child = _parent(model, entry.name)
        scale = getattr(parent, f"{child}_omega", None)
        if scale is not None:
            layer.register_forward_hook(_scale_output(scale))
        installed += 1
    return installed


def _scale_output(scale: OutputScale):
    def hook(_module, _args, output):
        if isinstance(output, tuple):  # (output, router logits) where the HF block returns both
            return (scale(output[0]), *output[1:])
        return scale(output)
    return hook


def routers(model: nn.Module) -> List[SparseMixerRouter]:
    """The SparseMixer routers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SparseMixerRouter)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every SparseMixer router's weighted auxiliary losses from the model's last forward."""
    found = [r.l_aux for r in routers(model) if r.l_aux is not None]
    if not found:
        raise AutoEPError("no SparseMixer router has run yet: call aux_loss(model) after the model's forward")
    return torch.stack(found).sum()

