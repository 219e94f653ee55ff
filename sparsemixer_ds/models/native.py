"""A decoder-only Transformer language model with Switch-style MoE blocks, written for one device.

Shape legend: B batch, T sequence, M model dim, H heads, D head dim, V vocabulary.
Expert parallelism is not visible here: the MoE blocks come from moe.py with an ``ep_size``, and
DeepSpeed lays the experts out over the expert-parallel group when the engine starts.
The model owns its training loss: given targets, ``forward`` returns the cross-entropy plus every MoE
layer's auxiliary losses, each already weighted by its gate (``moe.balance_coef``, ``moe.z_loss_coef``).

Activation checkpointing (``train.activation_checkpointing``) keeps only each block's input in the
forward and runs the block again in the backward (torch.utils.checkpoint, non-reentrant). The random
number generator's state is restored for that second run, so SparseMixer draws the same routes and
coins and dropout the same masks: the gradients are those of the forward that was run. The gates'
side effects repeat harmlessly in the recompute: ``terms`` are overwritten with the same values, the
routing statistics may add a second row equal to the first (their means divide by the number of rows),
and a global balance loss all-reduces again, on every rank in the same order.
"""
import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, MoEConfig
from ..routing.core import RoutingStats, sum_terms
from ..routing.registry import get_router
from .moe import make_moe, moe_gates


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    # With targets (else None), scalars:
    loss: Optional[torch.Tensor] = None  # what training minimises: ce + the MoE layers' weighted aux losses
    ce: Optional[torch.Tensor] = None  # detached: cross-entropy, nats per token
    balance_loss: Optional[torch.Tensor] = None  # detached: the MoE layers' balance losses summed, unweighted
    z_loss: Optional[torch.Tensor] = None  # detached: their router z-losses summed, unweighted (0 if off)


def feed_forward(model_dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(model_dim, hidden), nn.GELU(), nn.Linear(hidden, model_dim))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    """cos and sin of the rotary angles (RoFormer, Su et al. 2021): each (T, D / 2)."""
    inv_freq = 1.0 / base**(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by the position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rotary) -> torch.Tensor:
        B, T, M = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, M // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, M))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with a dense or an MoE FFN."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary):
        x = x + self.drop(self.attn(self.norm1(x), rotary))
        out = self.ffn(self.norm2(x))
        aux = None
        if isinstance(out, tuple):  # an MoE layer: (output, l_aux, exp_counts)
            out, aux, _ = out
        return x + self.drop(out), aux


class MoELM(nn.Module):
    """Token embedding (tied with the output), blocks, final norm. Every ``moe_every``-th block
    (the 2nd, 4th, ... for moe_every = 2, as in Switch) has an MoE FFN. With ``checkpoint_blocks``,
    training recomputes each block's activations in the backward instead of keeping them."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        if cfg.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be set (>= 1) before building the model; got {cfg.vocab_size}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        blocks = []
        router = get_router(moe.router)
        for i in range(cfg.n_layers):
            if (i + 1) % moe.moe_every == 0:
                ffn = make_moe(router, cfg.d_model, feed_forward(cfg.d_model, moe.expert_hidden),
                               num_experts=moe.num_experts, ep_size=moe.ep_size, k=moe.top_k,
                               capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
                               min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens,
                               options=moe.router_options())
            else:
                ffn = feed_forward(cfg.d_model, cfg.ffn_hidden)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.gates = moe_gates(self.blocks)  # a plain list: the modules stay registered once, in their blocks
        self.norm = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        head_dim = cfg.d_model // cfg.n_heads
        cos, sin = rotary_tables(cfg.seq_len, head_dim) if self.pos is None else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> LMOutput:
        """tokens (B, T) int64 -> logits (B, T, V); with targets (B, T) int64, also the training loss."""
        B, T = tokens.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embed(tokens)  # (B, T, M)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=tokens.device))
        rotary = None if self.pos is not None else (self.rope_cos, self.rope_sin)
        aux = x.new_zeros((), dtype=torch.float32)  # the MoE layers' l_aux, weighted by their gates
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # preserve_rng_state (the default): the recompute draws the same routes
                x, block_aux = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x, block_aux = block(x, rotary)
            if block_aux is not None:
                aux = aux + block_aux.float()
        logits = F.linear(self.norm(x), self.embed.weight)  # tied output embedding
        if targets is None:
            return LMOutput(logits)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        balance, z = sum_terms([gate.terms for gate in self.gates])
        return LMOutput(logits, ce + aux, ce.detach(), balance, z)

    def routing_stats(self) -> List[RoutingStats]:
        """Each MoE layer's routing statistics, in layer order (sparsemixer_ds.routing.core.RoutingStats)."""
        return [gate.stats for gate in self.gates]

    def generate(self, tokens: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 stop_id: int = -1) -> torch.Tensor:
        """Sample ``new_tokens`` after ``tokens`` (1, T0); the window slides past seq_len."""
        return sample(self, tokens, new_tokens, self.cfg.seq_len, temperature, top_k, stop_id)


@torch.no_grad()
def sample(model: nn.Module, tokens: torch.Tensor, new_tokens: int, window: int, temperature: float = 1.0,
           top_k: int = 0, stop_id: int = -1) -> torch.Tensor:
    """Sample ``new_tokens`` after ``tokens`` (1, T0) from any model whose ``model(tokens).logits`` is
    (1, T, V), each step reading the last ``window`` tokens; temperature 0 is greedy."""
    for _ in range(new_tokens):
        logits = model(tokens[:, -window:]).logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        if int(nxt) == stop_id:
            break
    return tokens
