"""``sparsemixer-ds plan``: what one rank of a run will hold and move, from the configs alone.

No run starts, the run directory is not touched and the data need not exist: the planner reads the
run config and the DS JSON and counts (sparsemixer_ds.models.flops for the model, families.training_state for
the training state). Per rank, in bytes:

- weights, gradients, optimizer state: ``ModelFamily.memory_estimate`` (exact up to DeepSpeed's padding
  and its gradient buckets); an optimizer offloaded to the CPU or NVMe (``offload_optimizer``) leaves the
  device, and so do ZeRO-3's offloaded weights (``offload_param``);
- activations of one micro-batch kept for the backward, per layer after Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1: sbh(34 + 5as/h) bytes in
  16 bits with dropout), adapted (``activations`` says how): widths of w bytes (2 for bf16/fp16, 4 for
  fp32); no dropout masks (dropout 0); attention through the fused kernel (scaled_dot_product_attention
  keeps its output and a log-sum-exp, not the 5as^2b score tensors); the FFN of an MoE layer on
  top_k x capacity_factor slots per token (1 for AutoEP, dropless and balanced on average), each slot
  holding the dispatched input and the expert output on both sides of the all-to-all; the logits in the
  training dtype, in fp32 and their log-softmax. With activation checkpointing each block keeps its
  input and one block at a time holds its full activations during the recompute;
- not counted: the framework (CUDA context, NCCL, about 0.5-1 GiB a GPU), the allocator's
  fragmentation, temporary buffers (ZeRO's gradient buckets and all-gathers, a ZeRO-3 layer's gathered
  weights, the backward's transient gradients of activations).

All-to-all volume: bytes a rank sends per optimizer step, 2 all-to-alls forward (dispatch, combine) and
2 backward per MoE layer (3 and 3 with activation checkpointing, whose recompute runs the forward's
again), each of tokens x top_k x capacity factor x M x w x (ep_size - 1) / ep_size.
"""
import json
from pathlib import Path
from typing import List, NamedTuple, Tuple

from .config import ConfigError, DSSettings, RunConfig, load_ds_config
from .data.loader import tokenizer_dir
from .models.families import MemoryEstimate, get_family
from .models.flops import ModelCost, training_dtype

__all__ = ["MemoryPlan", "plan_vocab_size", "activations", "all_to_all_bytes", "make_plan", "format_plan", "check_fits", "GiB"]

GiB = 1024**3


class MemoryPlan(NamedTuple):
    """One rank of a run, by the planner's figures (bytes unless said)."""
    cost: ModelCost
    state: MemoryEstimate  # weights, gradients, optimizer state (all on the rank, before offloading)
    offloaded: Tuple[str, ...]  # the parts ZeRO keeps off the device: "optimizer", "weights"
    activations: int  # at the configured micro-batch and activation checkpointing
    activations_full: int  # without activation checkpointing
    activations_checkpointed: int  # with it
    checkpointing: bool  # train.activation_checkpointing
    all_to_all: int  # bytes sent per rank per optimizer step
    tokens_per_step: int  # over all ranks
    world: int
    device_memory: int
    vocab_note: str  # where the vocabulary size came from

    @property
    def device_total(self) -> int:
        """What the device holds: the training state not offloaded, plus the activations."""
        state = (0 if "weights" in self.offloaded else self.state.weights) + self.state.gradients
        state += 0 if "optimizer" in self.offloaded else self.state.optimizer
        return state + self.activations

    @property
    def fits(self) -> bool:
        return self.device_total <= self.device_memory


def plan_vocab_size(cfg: RunConfig) -> str:
    """Set ``cfg.model.vocab_size`` for planning, without reading the token files, and say from where:
    the run config, the data's meta.json, or (family hf) the HF config's vocab_size. A ConfigError
    when none of them gives it."""
    if cfg.model.vocab_size:
        return f"model.vocab_size={cfg.model.vocab_size}"
    meta = tokenizer_dir(cfg) / "meta.json"
    if meta.is_file():
        cfg.model.vocab_size = int(json.loads(meta.read_text())["vocab_size"])
        return f"{meta}: vocab_size {cfg.model.vocab_size}"
    if cfg.model.family == "hf":
        from .models import hf
        vocab = hf._fields(cfg).get("vocab_size")
        if vocab:
            return f"the HF config: vocab_size {vocab}"
    hf_key = " or the HF config's vocab_size" if cfg.model.family == "hf" else ""
    raise ConfigError(f"the planner needs the vocabulary size: model.vocab_size is 0 and {meta} does not exist; "
                      f"set model.vocab_size{hf_key} (e.g. --set model.vocab_size=32000) or prepare the data first")


def activations(cost: ModelCost, micro_batch: int, width: int, slots_per_token: float,
                checkpointing: bool) -> int:
    """Bytes of activations one rank keeps for the backward of one micro-batch (see the module's
    docstring). Per token, with M = d_model, A = attention width, H heads, F/F_e the dense/expert
    hidden width, E experts, k = top_k, c = capacity slots per route:
        every layer: 2 M w (the inputs of both norms) + (M + 3A + A) w + 4 H (attention: its input,
                     Q K V expanded to A, its output; fp32 log-sum-exp per head)
        dense FFN:   (M + 2F) w, or (M + 4F) w with a gate (SwiGLU: gate and up, silu, their product)
        MoE FFN:     8 E (fp32 router logits and probabilities) + k c (4M + 2F_e) w, or k c (4M + 4F_e) w
        the output:  M w (final norm) + V (w + 8) (logits, their fp32 copy and log-softmax)
    With checkpointing: M w per layer (each block's input) + the largest layer's full activations."""
    M, A, H, V, w = cost.d_model, cost.attention_width, cost.n_heads, cost.vocab_size, width
    ffn_factor = 4 if cost.gated else 2
    common = 2 * M * w + (M + 4 * A) * w + 4 * H
    dense = common + (M + ffn_factor * cost.ffn_hidden) * w
    moe = common + 8 * cost.num_experts + cost.top_k * slots_per_token * (4 * M + ffn_factor * cost.expert_hidden) * w
    output = M * w + V * (w + 8)
    dense_layers = cost.n_layers - cost.moe_layers
    if checkpointing:
        largest = max(moe if cost.moe_layers else 0, dense if dense_layers else 0)
        per_token = cost.n_layers * M * w + largest + output
    else:
        per_token = dense_layers * dense + cost.moe_layers * moe + output
    return int(per_token * micro_batch * cost.seq_len)


def all_to_all_bytes(cost: ModelCost, tokens_per_rank_step: int, width: int, slots_per_token: float, ep_size: int,
                     checkpointing: bool) -> int:
    """Bytes one rank sends in the MoE layers' all-to-alls per optimizer step (module docstring)."""
    per_layer = (6 if checkpointing else 4) * tokens_per_rank_step * cost.top_k * slots_per_token * cost.d_model
    return int(cost.moe_layers * per_layer * width * (ep_size - 1) / ep_size)


def make_plan(cfg: RunConfig, world: int, device_memory: int) -> MemoryPlan:
    """The plan of ``cfg`` on ``world`` ranks with ``device_memory`` bytes each."""
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1 (the ranks the launch will start); got {world}")
    if world % cfg.moe.ep_size:
        raise ConfigError(f"world size {world} is not divisible by moe.ep_size={cfg.moe.ep_size}; "
                          f"plan for a multiple of {cfg.moe.ep_size} ranks or change moe.ep_size")
    vocab_note = plan_vocab_size(cfg)
    family = get_family(cfg)
    ds = load_ds_config(Path(cfg.ds_config), cfg, world)
    ds.update(family.ds_config(cfg, ds, cfg.ds_config))
    cost = family.cost(cfg)
    state = family.memory_estimate(cfg, ds, world)
    offloaded = DSSettings.of(ds).offloaded
    width = training_dtype(ds).itemsize
    t = cfg.train
    # Capacity slots per route: the native layer pads each expert to capacity when it drops tokens;
    # AutoEP and drop_tokens=false are dropless (1 on average; an imbalanced step holds more).
    slots = cfg.moe.capacity_factor if cfg.model.family == "native" and cfg.moe.drop_tokens else 1.0
    full = activations(cost, t.micro_batch, width, slots, checkpointing=False)
    checkpointed = activations(cost, t.micro_batch, width, slots, checkpointing=True)
    tokens_rank = t.micro_batch * t.grad_accum * cfg.model.seq_len
    return MemoryPlan(cost, state, offloaded, checkpointed if t.activation_checkpointing else full, full, checkpointed,
                      t.activation_checkpointing,
                      all_to_all_bytes(cost, tokens_rank, width, slots, cfg.moe.ep_size, t.activation_checkpointing),
                      tokens_rank * world, world, device_memory, vocab_note)


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2**20:,.1f} MiB"


def _flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 1e6:,.2f} MFLOP"


def format_plan(cfg: RunConfig, plan: MemoryPlan) -> str:
    """The plan as a table, and a last line that says whether it fits."""
    c, s = plan.cost, plan.state
    t = cfg.train
    rows: List[Tuple[str, str]] = [
        ("vocabulary", plan.vocab_note),
        ("parameters", f"{c.total:,} total, {c.active:,} active per token ({c.moe_layers} MoE layers of "
                       f"{c.num_experts} experts, top_{c.top_k})"),
        ("parameters per rank", f"{s.params:,} ({s.expert_params:,} in its experts; moe.ep_size {cfg.moe.ep_size})"),
        ("training FLOPs", f"{_flops(c.flops_per_token)} per token, {_flops(c.flops_per_token * plan.tokens_per_step)} "
                           f"per step of {plan.tokens_per_step:,} tokens (6 x active matmul weights + attention + "
                           "routers)"),
        ("weights", _gib(s.weights) + (" (offloaded)" if "weights" in plan.offloaded else "")),
        ("gradients", _gib(s.gradients)),
        ("optimizer state", _gib(s.optimizer) + (" (offloaded)" if "optimizer" in plan.offloaded else "")
         + f"  [ZeRO stage {s.zero_stage}]"),
        ("activations", f"{_gib(plan.activations)} at micro_batch {t.micro_batch} x seq_len {cfg.model.seq_len} "
                        f"(activation checkpointing {'on' if plan.checkpointing else 'off'}; "
                        f"off: {_gib(plan.activations_full)}, on: {_gib(plan.activations_checkpointed)})"),
        ("device total", f"{_gib(plan.device_total)} of {_gib(plan.device_memory)} "
                         f"({plan.device_total / plan.device_memory:.0%})"),
        ("all-to-all", f"{_gib(plan.all_to_all)} sent per rank per step"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if plan.fits:
        lines.append(f"fits: {plan.world} ranks, {_gib(plan.device_total)} of {_gib(plan.device_memory)} per rank")
    return "\n".join(lines)


def check_fits(cfg: RunConfig, plan: MemoryPlan) -> None:
    """A ConfigError that says by how much the plan does not fit, and what would make it fit."""
    if plan.fits:
        return
    hints = []
    if not plan.checkpointing:
        hints.append(f"train.activation_checkpointing=true (activations {_gib(plan.activations_checkpointed)})")
    if cfg.train.micro_batch > 1:
        hints.append("a smaller train.micro_batch (with a larger train.grad_accum)")
    if plan.state.zero_stage < 2 or (plan.state.zero_stage < 3 and cfg.model.family == "hf"):
        hints.append("a higher ZeRO stage")
    hints.append("more ranks with a larger moe.ep_size")
    raise ConfigError(f"does not fit: {_gib(plan.device_total)} per rank (weights {_gib(plan.state.weights)}, gradients "
                      f"{_gib(plan.state.gradients)}, optimizer {_gib(plan.state.optimizer)}, activations "
                      f"{_gib(plan.activations)}) but a device has {_gib(plan.device_memory)} "
                      f"(--device-memory-gb); try {', or '.join(hints)}")
