"""What a model costs: its parameters (all, and those one token uses) and its training FLOPs per token,
from the run config alone (no model is built), for both families.

Counting convention (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, App. B; Megatron-LM's MFU):
- a matmul with a weight of P entries costs 2P FLOPs per token forward and 4P backward (the gradients
  of its input and of its weight): 6P per trained token. Biases, norms, activations, softmax, rotary
  and the cross-entropy are elementwise work and are not counted; an embedding lookup is a gather,
  not a matmul; the LM head is a matmul (tied or not);
- attention's two matmuls with no weight (Q K^T and the weights times V) cost 12 x seq_len x A FLOPs
  per token per layer for forward and backward together (A = heads x head dim, the width of Q), the
  causal mask counted as full: a kernel that skips the masked half does half of that, but the model
  FLOPs of utilisation are the same for every kernel (PaLM's and Megatron's choice);
- an MoE layer counts its router, 6 x M x E per token (every token's logits over all E experts),
  and top_k experts per token: the model FLOPs of a token that is routed, not what the hardware does.
  DeepSpeed's capacity-based layer (family native) runs its experts on ceil(tokens / E x factor x k)
  slots per expert whether they are full or not, and its dispatch/combine einsums are matmuls over the
  capacity; dropped tokens skip their expert. Those differences are the system's, not the model's, so
  they lower (or raise) MFU instead of entering the count. AutoEP (family hf) is dropless.

With activation checkpointing the recomputed forward is not counted either: MFU counts model FLOPs
(hardware FLOPs utilisation would count it).

Model FLOPs utilisation (MFU) = flops_per_token x tokens/s of a rank / the rank's peak FLOP/s. The peak
is ``train.peak_tflops`` when set, else ``measure_peak``: a large square matmul in the training dtype
on the rank's device, timed after a warm-up, best of a few. On a CPU every rank measures at the same
time as the others, so each gets the share of the cores it trains with.
"""
import time
from typing import NamedTuple

import torch

from ..config import ConfigError, DSSettings, RunConfig

__all__ = ["ModelCost", "native_cost", "hf_cost", "Peak", "training_dtype", "measure_peak",
           "peak_flops"]


class ModelCost(NamedTuple):
    """A model's size and work, per the convention above. Counts are parameters; widths are channels."""
    total: int  # every parameter, every expert of every MoE layer
    active: int  # the parameters one token uses: all but (E - top_k) experts per MoE layer
    expert: int  # of total, in the experts
    matmul_active: int  # the weights of the matmuls one token goes through, the LM head included, routers not
    router: int  # the routers' weights, M x E per MoE layer
    embedding: int  # the lookup tables (token, learned positions): no FLOPs
    n_layers: int
    moe_layers: int
    num_experts: int  # E per MoE layer
    top_k: int
    d_model: int  # M
    attention_width: int  # A = heads x head dim: the width of Q, K and V after expansion
    kv_width: int  # K and V projections' width (grouped-query attention: kv heads x head dim)
    n_heads: int
    expert_hidden: int  # F_e, the hidden width of one expert
    ffn_hidden: int  # F, the hidden width of a dense FFN block (0 if there is none)
    gated: bool  # expert/FFN with a gate (SwiGLU: 3 matrices) rather than 2 matrices and a GELU
    vocab_size: int
    seq_len: int

    @property
    def attention_flops(self) -> int:
        """Q K^T and the weights times V, forward and backward, per token: 12 x layers x seq_len x A."""
        return 12 * self.n_layers * self.seq_len * self.attention_width

    @property
    def router_flops(self) -> int:
        """Every MoE layer's router logits, forward and backward, per token: 6 x M x E per layer."""
        return 6 * self.router

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 x active matmul weights + attention + routers."""
        return 6 * self.matmul_active + self.attention_flops + self.router_flops


def native_cost(cfg: RunConfig) -> ModelCost:
    """The cost of sparsemixer_ds.models.native.MoELM: pre-norm blocks (LayerNorm with bias), attention with
    one fused QKV Linear and an output Linear (biases), GELU FFNs (two Linears with biases), tied LM head,
    SparseMixer's omega [M] per MoE layer for the estimators that train one (midpoint, midpoint-all); E experts in every MoE layer, all
    of them counted (each rank builds num_experts / ep_size; the model has them all)."""
    m, moe = cfg.model, cfg.moe
    M, V, L, F, Fe, E = m.d_model, m.vocab_size, m.n_layers, m.ffn_hidden, moe.expert_hidden, moe.num_experts
    if V < 1:
        raise ConfigError(f"model.vocab_size={V}: the cost of a model needs its vocabulary; set model.vocab_size or "
                          "give a data.path (or data.sources) whose meta.json holds it")
    moe_layers = sum((i + 1) % moe.moe_every == 0 for i in range(L))
    dense_layers = L - moe_layers
    attention = 4 * M * M  # qkv [3M, M] and proj [M, M]
    attention_other = 3 * M + M + 4 * M  # their biases, two LayerNorms (weight and bias)
    dense_ffn, dense_other = 2 * M * F, F + M
    one_expert, one_expert_other = 2 * M * Fe, Fe + M
    omega = M if moe.router_options().omega else 0
    embedding = V * M + (m.seq_len * M if m.positions == "learned" else 0)
    expert = moe_layers * E * (one_expert + one_expert_other)
    router = moe_layers * M * E
    total = (embedding + L * (attention + attention_other) + dense_layers * (dense_ffn + dense_other)
             + expert + router + moe_layers * omega + 2 * M)
    active = total - moe_layers * (E - moe.top_k) * (one_expert + one_expert_other)
    matmul_active = L * attention + dense_layers * dense_ffn + moe_layers * moe.top_k * one_expert + V * M
    return ModelCost(total, active, expert, matmul_active, router, embedding, L, moe_layers, E, moe.top_k, M, M, M,
                     m.n_heads, Fe, F if dense_layers else 0, False, V, m.seq_len)


def hf_cost(cfg: RunConfig, config) -> ModelCost:
    """The cost of the Hugging Face model of ``config`` (a transformers PhimoeConfig, MixtralConfig or
    Qwen3MoeConfig, as sparsemixer_ds.models.hf.hf_config gives it): attention with separate q, k, v, o
    projections (grouped-query: k and v have num_key_value_heads heads; biases if attention_bias),
    SwiGLU experts of 3 matrices (gate_up [2I, M] and down [M, I]: I = intermediate_size, or
    moe_intermediate_size for Qwen3-MoE), a router [E, M] without bias, LayerNorm (PhiMoE: weight and
    bias) or RMSNorm (weight), Qwen3's per-head q/k RMSNorm, its dense MLP layers (mlp_only_layers,
    decoder_sparse_step), an LM head tied or not (PhiMoE: lm_head_bias), and omega [M] per MoE layer
    for the estimators that train one."""
    from . import hf
    kind = config.model_type
    M, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    H, KV = config.num_attention_heads, config.num_key_value_heads
    head = getattr(config, "head_dim", None) or M // H
    E, k = hf.num_experts(config), config.num_experts_per_tok
    Fe = config.moe_intermediate_size if kind == "qwen3_moe" else config.intermediate_size
    if kind == "qwen3_moe":
        sparse = [i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0 for i in range(L)]
    else:
        sparse = [True] * L
    moe_layers = sum(sparse)
    dense_layers = L - moe_layers
    F = config.intermediate_size if dense_layers else 0
    norm = 2 * M if kind == "phimoe" else M  # LayerNorm with bias, or RMSNorm
    attention = 2 * M * H * head + 2 * M * KV * head  # q and o; k and v
    # q, k, v and o biases (Mixtral has none)
    attention_other = H * head + 2 * KV * head + M if getattr(config, "attention_bias", False) else 0
    if kind == "qwen3_moe":
        attention_other += 2 * head  # q_norm, k_norm
    one_expert = 3 * M * Fe
    omega = M if cfg.moe.router_options().omega else 0
    tied = config.tie_word_embeddings
    lm_head_bias = V if kind == "phimoe" and getattr(config, "lm_head_bias", False) else 0
    embedding = V * M
    expert = moe_layers * E * one_expert
    router = moe_layers * M * E
    total = (embedding + (0 if tied else V * M) + lm_head_bias + L * (attention + attention_other + 2 * norm)
             + dense_layers * 3 * M * F + expert + router + moe_layers * omega + norm)
    active = total - moe_layers * (E - k) * one_expert
    matmul_active = L * attention + dense_layers * 3 * M * F + moe_layers * k * one_expert + V * M
    return ModelCost(total, active, expert, matmul_active, router, embedding, L, moe_layers, E, k, M, H * head,
                     KV * head, H, Fe, F, True, V, cfg.model.seq_len)


class Peak(NamedTuple):
    """A rank's peak FLOP/s and where the number comes from."""
    flops: float  # FLOP/s
    source: str  # "train.peak_tflops", or the measurement: dtype, size, device, repeats


def training_dtype(ds: dict) -> torch.dtype:
    """The dtype the DS JSON ``ds`` trains the matmuls in: bf16 or fp16 if enabled, else fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[DSSettings.of(ds).precision]


def measure_peak(device: torch.device, dtype: torch.dtype, size: int = 0, repeats: int = 5) -> Peak:
    """The FLOP/s of a ``size`` x ``size`` matmul (2 size^3 FLOPs) in ``dtype`` on ``device``: the
    fastest of ``repeats`` timed calls after one warm-up, each timed between accelerator synchronisations.
    ``size`` 0: 8192 on an accelerator (big enough to reach its tensor-core peak), 1024 on a CPU (as fast per
    FLOP there as 2048, in a tenth of the time)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    size = size or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        accelerator.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        accelerator.synchronize()
        if i:  # the first call is the warm-up (kernel choice, allocation)
            best = min(best, time.perf_counter() - start)
    name = str(dtype).replace("torch.", "")
    return Peak(2 * size**3 / best, f"measured: {name} matmul {size}x{size} on {device}, best of {repeats}")


def peak_flops(cfg: RunConfig, ds: dict, device: torch.device) -> Peak:
    """A rank's peak FLOP/s: ``train.peak_tflops`` if > 0, else measured on ``device`` in the dtype of ``ds``."""
    if cfg.train.peak_tflops > 0:
        return Peak(cfg.train.peak_tflops * 1e12, "train.peak_tflops")
    return measure_peak(device, training_dtype(ds))
