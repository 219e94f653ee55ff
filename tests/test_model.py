"""The language model, its router choices, the router statistics and the LR schedule (one process)."""
import math

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE

from sparsemixer_ds import SparseMixerGate, SparseMixerMoE
from sparsemixer_ds.config import load_config
from sparsemixer_ds.models.families import FAMILIES, get_family
from sparsemixer_ds.models.moe import BaselineGate
from sparsemixer_ds.models.native import MoELM
from sparsemixer_ds.routing.core import RoutingStats
from sparsemixer_ds.routing.registry import ROUTERS
from sparsemixer_ds.run.optim import warmup_cosine
from sparsemixer_ds.train import step_seed

SMALL = ["model.vocab_size=50", "model.d_model=32", "model.n_heads=2", "model.n_layers=4", "model.seq_len=16",
         "model.ffn_hidden=64", "moe.num_experts=4", "moe.expert_hidden=32"]


def small_model(*overrides):
    cfg = load_config(None, SMALL + list(overrides))
    torch.manual_seed(0)
    return MoELM(cfg.model, cfg.moe), cfg


ROUTER_CASES = [  # router, k, the gate it must build, the estimator that gate must run
    ("sparsemixer", 1, SparseMixerGate, "midpoint"),
    ("sparsemixer-v2", 2, SparseMixerGate, "heun3"),
    ("switch", 1, BaselineGate, None),
    ("gshard", 2, BaselineGate, None),
    ("sampled", 1, SparseMixerGate, "sampled"),
    ("euler", 2, SparseMixerGate, "euler"),
    ("midpoint-all", 1, SparseMixerGate, "midpoint-all"),
]


def test_every_registered_router_is_covered():
    assert {case[0] for case in ROUTER_CASES} == set(ROUTERS)


@pytest.mark.parametrize("router, k, gate_type, estimator", ROUTER_CASES)
def test_router_choice_builds_the_right_moe_blocks(router, k, gate_type, estimator):
    model, _ = small_model(f"moe.router={router}", f"moe.top_k={k}")
    kinds = [isinstance(block.ffn, MoE) for block in model.blocks]
    assert kinds == [False, True, False, True], "every 2nd block is MoE, as in Switch"
    for block in model.blocks[1::2]:
        gate = block.ffn.deepspeed_moe.gate
        assert type(gate) is gate_type and gate.k == k
        assert gate.options.estimator == estimator
        # omega belongs to the midpoint estimators, whose forward pass runs some experts at half scale
        assert (getattr(block.ffn, "omega", None) is not None) == (estimator or "").startswith("midpoint")
    tokens = torch.randint(0, 50, (2, 16))
    assert model(tokens).logits.shape == (2, 16, 50) and model(tokens).loss is None
    out = model(tokens, tokens)
    assert out.loss.shape == () and out.loss.requires_grad and not out.ce.requires_grad
    assert len(model.routing_stats()) == 2


def test_switch_router_uses_input_jitter_and_sparsemixer_keeps_omega():
    switch, _ = small_model("moe.router=switch")
    assert switch.blocks[1].ffn.deepspeed_moe.gate.noisy_gate_policy == "Jitter"
    mixer, _ = small_model()
    assert isinstance(mixer.blocks[1].ffn, SparseMixerMoE) and mixer.blocks[1].ffn.omega is not None


@pytest.mark.parametrize("router, balance_coef, z_loss_coef, training", [
    ("sparsemixer", 0.01, 0.002, True),
    ("sparsemixer-v2", 0.0, 0.002, True),  # a z-loss without a balance loss
    ("sparsemixer", 0.05, 0.0, False),
    ("switch", 0.01, 0.0, False),  # eval: DeepSpeed's gate without its input jitter, so the input gives its logits
])
def test_the_loss_is_cross_entropy_plus_each_moe_term_weighted_by_its_own_coefficient(router, balance_coef, z_loss_coef,
                                                                                      training):
    model, _ = small_model(f"moe.router={router}", f"moe.balance_coef={balance_coef}", f"moe.z_loss_coef={z_loss_coef}")
    model.train(training)
    calls = []
    for block in model.blocks[1::2]:
        block.ffn.deepspeed_moe.gate.register_forward_hook(lambda gate, args, out: calls.append((gate, args[0], out)))
    tokens, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    out = model(tokens, targets)
    # The reference, in float64 from each gate's input and its routes: Switch eq. 4 and ST-MoE eq. 5.
    balance = z = 0.0
    for gate, x, routes in calls:
        logits = x.detach().double() @ gate.wg.weight.detach().double().t()
        exp_counts = routes[-1].double()
        fraction = exp_counts / (x.shape[0] * gate.k)
        balance += float(4 * (torch.softmax(logits, dim=1).mean(0) * fraction).sum())
        z += float((torch.logsumexp(logits, dim=1)**2).mean())
    ce = float(F.cross_entropy(out.logits.detach().double().flatten(0, 1), targets.flatten()))
    assert len(calls) == 2
    assert float(out.ce) == pytest.approx(ce, rel=1e-6)
    assert float(out.balance_loss) == pytest.approx(balance, rel=1e-5)
    assert float(out.z_loss) == pytest.approx(z if z_loss_coef else 0.0, rel=1e-5)
    assert out.loss.item() == pytest.approx(ce + balance_coef * balance + z_loss_coef * z, rel=1e-6)


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
    from sparsemixer_ds.models.native import apply_rotary, rotary_tables
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


@pytest.mark.parametrize("make_gate", [
    lambda: SparseMixerGate(8, 4, k=2, capacity_factor=0.5, min_capacity=1),
    lambda: BaselineGate(8, 4, k=2, capacity_factor=0.5, min_capacity=1),  # gshard: no input jitter
])
def test_routing_statistics_come_from_the_routes_the_gate_computed(make_gate):
    torch.manual_seed(0)
    gate = make_gate()
    x = torch.randn(64, 8)
    gate.stats.recording = True
    torch.manual_seed(3)
    routes = gate(x, None, True)
    stats = RoutingStats.summarize(gate.stats.take(torch.device("cpu")))
    exp_counts = routes[-1]
    assert stats["load"] == pytest.approx((exp_counts.double() / exp_counts.sum()).tolist())
    assert stats["dropped"] == pytest.approx(float((routes[3] < 0).double().mean()))
    assert stats["dropped"] > 0
    p = torch.softmax(x @ gate.wg.weight.detach().t(), dim=1).double()
    assert stats["entropy"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    assert stats["max_mean_load"] == pytest.approx(max(stats["load"]) * 4)
    gate.stats.recording = False
    gate(x, None, True)
    assert float(gate.stats.take(torch.device("cpu"))[-1]) == 0, "a gate that is not recording records nothing"


def test_the_native_family_builds_the_model_and_exports_its_weights():
    cfg = load_config(None, SMALL)
    family = get_family(cfg)
    assert FAMILIES["native"] is family and cfg.model.family == "native"
    torch.manual_seed(0)
    model = family.build(cfg)
    assert isinstance(model, MoELM)
    assert all(key in family.shape_keys for key in ("model.family", "model.d_model", "moe.num_experts"))
    tensors = family.export_state(model)
    torch.manual_seed(1)
    other = family.build(cfg)
    family.load_export_state(other, tensors)
    for name, value in other.state_dict().items():
        assert torch.equal(value, tensors[name]) and value.data_ptr() != model.state_dict()[name].data_ptr()


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
