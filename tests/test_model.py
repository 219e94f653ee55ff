"""The language model, its router choices, the router statistics and the LR schedule (one process)."""
import math

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from sparsemixer_ds import SparseMixerGate, SparseMixerMoE
from sparsemixer_ds.config import load_config
from sparsemixer_ds.model import MoELM
from sparsemixer_ds.moe import RouterMonitor
from sparsemixer_ds.train import step_seed, warmup_cosine

SMALL = ["model.vocab_size=50", "model.d_model=32", "model.n_heads=2", "model.n_layers=4", "model.seq_len=16",
         "model.ffn_hidden=64", "moe.num_experts=4", "moe.expert_hidden=32"]


def small_model(*overrides):
    cfg = load_config(None, SMALL + list(overrides))
    torch.manual_seed(0)
    return MoELM(cfg.model, cfg.moe), cfg


@pytest.mark.parametrize("router, k, gate_type, estimator", [
    ("sparsemixer", 1, SparseMixerGate, "midpoint"),
    ("sparsemixer-v2", 2, SparseMixerGate, "heun3"),
    ("switch", 1, TopKGate, None),
    ("gshard", 2, TopKGate, None),
    ("sampled", 1, SparseMixerGate, "sampled"),
    ("euler", 2, SparseMixerGate, "euler"),
    ("midpoint-all", 1, SparseMixerGate, "midpoint-all"),
])
def test_router_choice_builds_the_right_moe_blocks(router, k, gate_type, estimator):
    model, _ = small_model(f"moe.router={router}", f"moe.top_k={k}")
    kinds = [isinstance(block.ffn, MoE) for block in model.blocks]
    assert kinds == [False, True, False, True], "every 2nd block is MoE, as in Switch"
    for block in model.blocks[1::2]:
        gate = block.ffn.deepspeed_moe.gate
        assert type(gate) is gate_type and gate.k == k
        assert getattr(gate, "estimator", None) == estimator
        # omega belongs to the midpoint estimators, whose forward pass runs some experts at half scale
        assert (getattr(block.ffn, "omega", None) is not None) == (estimator or "").startswith("midpoint")
    out = model(torch.randint(0, 50, (2, 16)))
    assert out.logits.shape == (2, 16, 50) and out.aux_loss.shape == () and out.aux_loss.requires_grad
    assert model.embed.weight.data_ptr() == model.embed.weight.data_ptr()


def test_switch_router_uses_input_jitter_and_sparsemixer_keeps_omega():
    switch, _ = small_model("moe.router=switch")
    assert switch.blocks[1].ffn.deepspeed_moe.gate.noisy_gate_policy == "Jitter"
    mixer, _ = small_model()
    assert isinstance(mixer.blocks[1].ffn, SparseMixerMoE) and mixer.blocks[1].ffn.omega is not None


def test_z_loss_weight_in_the_training_loss_is_z_loss_coef():
    model, cfg = small_model("moe.z_loss_coef=0.002", "moe.balance_coef=0.01")
    gate = model.blocks[1].ffn.deepspeed_moe.gate
    assert cfg.moe.balance_coef * gate.z_loss_coef == pytest.approx(0.002)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
@pytest.mark.parametrize("router, k", [("sparsemixer", 1), ("gshard", 2)])
def test_causal_future_tokens_do_not_change_past_logits(positions, router, k):
    model, _ = small_model(f"model.positions={positions}", f"moe.router={router}", f"moe.top_k={k}",
                           "moe.drop_tokens=false")
    model.eval()
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    with torch.no_grad():  # the same draws for both (gshard samples its 2nd expert in eval too)
        torch.manual_seed(1)
        a = model(tokens).logits
        torch.manual_seed(1)
        b = model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_rotary_attention_depends_on_relative_position_only():
    """Shifting a whole sequence by some positions leaves rotary attention scores unchanged."""
    from sparsemixer_ds.model import apply_rotary, rotary_tables
    cos, sin = rotary_tables(32, 8)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    scores_at = lambda start: apply_rotary(q, cos[start:start + 4], sin[start:start + 4]) @ apply_rotary(
        k, cos[start:start + 4], sin[start:start + 4]).transpose(-1, -2)
    assert torch.allclose(scores_at(0), scores_at(11), atol=1e-5)


def test_generate_appends_tokens_and_greedy_is_deterministic():
    model, _ = small_model()
    model.eval()
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)  # tokens over capacity are dropped at random (RTS) in eval as in training
    first = model.generate(prompt, 20, temperature=0)  # longer than seq_len: the window slides
    assert first.shape == (1, 23) and torch.equal(first[:, :3], prompt)
    torch.manual_seed(0)
    assert torch.equal(first, model.generate(prompt, 20, temperature=0))


def test_router_monitor_statistics_match_the_routes():
    torch.manual_seed(0)
    gate = SparseMixerGate(8, 4, k=2, capacity_factor=0.5, min_capacity=1)
    holder = nn.ModuleDict({"gate": gate})
    monitor = RouterMonitor(holder)
    x = torch.randn(64, 8)
    monitor.active = True
    torch.manual_seed(3)
    routes = gate(x, None, True)
    stats = RouterMonitor.summarize(monitor.collect()[0])
    load = torch.bincount(routes.exp_counts.new_tensor(list(range(4))).repeat_interleave(routes.exp_counts), minlength=4)
    assert stats["load"] == pytest.approx((load.double() / load.sum()).tolist())
    assert stats["dropped"] == pytest.approx(float((routes.indices_KS < 0).double().mean()))
    assert stats["dropped"] > 0
    p = torch.softmax(x @ gate.wg.weight.detach().t(), dim=1).double()
    assert stats["entropy"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    assert stats["max_mean_load"] == pytest.approx(max(stats["load"]) * 4)
    monitor.active = False
    gate(x, None, True)
    assert float(monitor.collect()[0][-1]) == 0, "inactive monitors record nothing"
    monitor.close()


def test_warmup_then_cosine_to_the_floor():
    cfg = load_config(None, ["train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    factor = warmup_cosine(cfg, total=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1)


def test_step_seeds_differ_by_step_micro_step_and_rank():
    seeds = {step_seed(0, s, m, r) for s in range(3) for m in range(2) for r in range(2)}
    assert len(seeds) == 12 and step_seed(0, 1, 1, 1) == step_seed(0, 1, 1, 1)
