"""Small models shared by the in-process tests and the scripts the deepspeed launcher runs."""
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from sparsemixer_ds import SparseMixerMoE
from sparsemixer_ds.models.native import feed_forward

EXPERT_HIDDEN = 32  # the experts of these models: feed_forward(model_dim, EXPERT_HIDDEN)


def sparsemixer_layer(model_dim: int = 16, num_experts: int = 4, ep_size: int = 1, seed: int = 0,
                      **kwargs) -> SparseMixerMoE:
    """A single-process SparseMixerMoE with the reference weights of ``seed``."""
    layer = SparseMixerMoE(model_dim, feed_forward(model_dim, EXPERT_HIDDEN), num_experts=num_experts, ep_size=ep_size,
                           **kwargs)
    load_reference_weights(layer, seed)
    return layer


def load_reference_weights(layer: SparseMixerMoE, seed: int) -> None:
    """Weights that depend on ``seed`` alone, not on ep_size: all experts are drawn and each rank
    keeps the block its expert-parallel group gives it (call after the group exists)."""
    model_dim, num_experts = layer.gate.wg.in_features, layer.num_experts
    torch.manual_seed(seed)
    full = [feed_forward(model_dim, EXPERT_HIDDEN) for _ in range(num_experts)]
    router = torch.randn(num_experts, model_dim) * 0.5
    offset = local_expert_offset(layer)
    with torch.no_grad():
        layer.gate.wg.weight.copy_(router)
        for j, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(full[offset + j].state_dict())


def local_expert_offset(layer: MoE) -> int:
    """Global index of this rank's first expert (0 while there is no EP group)."""
    group = layer.deepspeed_moe.ep_group
    if group is None:
        return 0
    return torch.distributed.get_rank(group) * layer.num_local_experts


# Expert-parallel equivalence cases: the launched job and the single-process reference share them.
EP_CASES = {
    "midpoint-k1-capacity": dict(k=1, estimator="midpoint", capacity_factor=1.0, min_capacity=1),
    "heun3-k2-dropless": dict(k=2, estimator="heun3", drop_tokens=False),
}


def ep_batch(rank: int) -> torch.Tensor:
    """The input rank ``rank`` routes: (B, T, M)."""
    return torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(1000 + rank))


def ep_loss(out: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * probe).sum() + 0.1 * l_aux


class TinyMoEModel(nn.Module):
    """Embedding -> [stock DeepSpeed MoE block] x 2 -> vocabulary logits, for convert() tests."""

    def __init__(self, vocab: int = 32, model_dim: int = 16, num_experts: int = 4, ep_size: int = 1,
                 use_residual_last: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, model_dim)
        self.blocks = nn.ModuleList([
            MoE(model_dim, feed_forward(model_dim, EXPERT_HIDDEN), num_experts=num_experts, ep_size=ep_size, k=k,
                capacity_factor=2.0, min_capacity=4, noisy_gate_policy="Jitter" if k == 1 else None,
                use_residual=use_residual_last and k == 2) for k in (1, 2)
        ])
        self.norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, vocab)

    def forward(self, tokens: torch.Tensor):
        h = self.embed(tokens)  # (B, T, M)
        aux = h.new_zeros(())
        for block in self.blocks:
            out, l_aux, _ = block(h)
            h = h + out
            aux = aux + l_aux
        return self.head(self.norm(h)), aux
