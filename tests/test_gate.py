"""SparseMixerGate against the contracts DeepSpeed's MOELayer consumes, the baselines' gate against
DeepSpeed's TopKGate, and convert()."""
import math

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter
from models import TinyMoEModel, sparsemixer_layer

from sparsemixer_ds import SparseMixerGate, SparseMixerMoE, convert, sparsemixer
from sparsemixer_ds.config import load_config
from sparsemixer_ds.models.moe import BaselineGate, make_moe
from sparsemixer_ds.models.native import MoELM
from sparsemixer_ds.routing.registry import RouterOptions, get_router


def make_gate(model_dim=8, num_experts=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    gate = SparseMixerGate(model_dim, num_experts, **kwargs)
    return gate


def route(gate, x, seed=11, **kwargs):
    torch.manual_seed(seed)
    return gate(x, sparse_routes=True, **kwargs)


@pytest.mark.parametrize("k", [1, 2])
def test_sparse_routes_have_the_shapes_and_dtypes_moelayer_reads(k):
    gate = make_gate(k=k)
    x = torch.randn(40, 8)
    l_aux, capacity, num_experts, indices, locations, gates, exp_counts = route(gate, x)
    assert l_aux.shape == () and l_aux.dtype == torch.float32
    assert capacity.dtype == torch.int64 and int(capacity) == max(math.ceil(40 / 4 * 1.0 * k), 8)
    assert num_experts == 4
    assert indices.shape == (k, 40) and indices.dtype == torch.int32
    assert locations.shape == (k, 40) and locations.dtype == torch.int32
    assert gates.shape == (k, 40) and gates.dtype == torch.float32 and gates.requires_grad
    assert exp_counts.shape == (4, ) and exp_counts.dtype == torch.int64 and int(exp_counts.sum()) == 40 * k


@pytest.mark.parametrize("k", [1, 2])
def test_gates_are_the_sparsemixer_weights(k):
    gate = make_gate(k=k, drop_tokens=False)
    x = torch.randn(40, 8)
    routes = route(gate, x)
    torch.manual_seed(11)  # the same draws, straight from the estimator
    experts, weights = sparsemixer(F.linear(x, gate.wg.weight), top_k=k)
    assert torch.equal(routes.indices_KS.long(), experts.t())
    assert torch.equal(routes.gates_KS, weights.t())


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("estimator", ["midpoint", "heun3"])
def test_the_fused_gate_routes_and_trains_as_the_eager_one(k, estimator):
    torch._dynamo.reset()
    x = torch.randn(96, 8)
    results = []
    for impl in ("eager", "fused"):
        gate = make_gate(k=k, estimator=estimator, routing_impl=impl, capacity_factor=0.75, min_capacity=1)
        routes = route(gate, x)
        (routes.gates_KS * torch.arange(96.0)).sum().add(routes.l_aux).backward()
        results.append((routes, gate.wg.weight.grad))
    (eager, eager_grad), (fused, fused_grad) = results
    for field in ("indices_KS", "locations_KS", "exp_counts", "capacity"):
        assert torch.equal(getattr(eager, field), getattr(fused, field)), field
    torch.testing.assert_close(fused.gates_KS, eager.gates_KS)
    torch.testing.assert_close(fused.l_aux, eager.l_aux)
    torch.testing.assert_close(fused_grad, eager_grad)


@pytest.mark.parametrize("k", [1, 2])
def test_dense_form_matches_the_sparse_routes(k):
    gate = make_gate(k=k, capacity_factor=0.5, min_capacity=1)  # tight capacity: some routes are dropped
    x = torch.randn(40, 8)
    routes = route(gate, x)
    torch.manual_seed(11)
    l_aux, combine, dispatch, exp_counts = gate(x)  # dense is the default contract
    capacity = int(routes.capacity)
    assert combine.shape == (40, 4, capacity) and dispatch.shape == combine.shape and dispatch.dtype == torch.bool
    assert torch.equal(l_aux, routes.l_aux) and torch.equal(exp_counts, routes.exp_counts)
    expect = torch.zeros(40, 4, capacity)
    for j in range(k):
        for s in range(40):
            e = int(routes.indices_KS[j, s])
            if e >= 0:
                expect[s, e, int(routes.locations_KS[j, s])] = routes.gates_KS[j, s]
    assert torch.equal(combine, expect)
    assert torch.equal(dispatch, expect > 0)
    assert int((routes.indices_KS < 0).sum()) > 0, "the case must drop routes"


def test_capacity_drops_overflow_in_token_order_without_rts():
    gate = make_gate(num_experts=4, min_capacity=3, use_rts=False, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 0 by a wide margin
        gate.wg.weight.zero_()
        gate.wg.weight[0, 0] = 50.0
    x = torch.zeros(20, 8)
    x[:, 0] = 1.0
    gate.eval()
    routes = route(gate, x)
    capacity = max(math.ceil(20 / 4 * 1.0), 3)
    assert int(routes.capacity) == capacity
    assert routes.indices_KS[0, :capacity].tolist() == [0] * capacity
    assert routes.indices_KS[0, capacity:].tolist() == [-1] * (20 - capacity)
    assert routes.locations_KS[0, :capacity].tolist() == list(range(capacity))
    assert bool((routes.gates_KS[0, capacity:] == 0).all())
    assert routes.exp_counts.tolist() == [20, 0, 0, 0], "counts are taken before capacity"


def test_rts_keeps_a_random_subset_with_distinct_slots():
    gate = make_gate(num_experts=4, min_capacity=3, use_rts=True)
    with torch.no_grad():
        gate.wg.weight.zero_()
        gate.wg.weight[0, 0] = 50.0
    x = torch.zeros(20, 8)
    x[:, 0] = 1.0
    gate.eval()
    kept_sets = set()
    for seed in range(5):
        routes = route(gate, x, seed=seed)
        kept = (routes.indices_KS[0] >= 0).nonzero().flatten()
        assert kept.numel() == 5
        assert sorted(routes.locations_KS[0, kept].tolist()) == list(range(5))
        kept_sets.add(tuple(kept.tolist()))
    assert len(kept_sets) > 1, "random token selection must vary with the seed"


def test_first_choices_claim_slots_before_second_choices():
    gate = make_gate(num_experts=4, k=2, use_rts=False, eval_capacity_factor=0.25, min_capacity=0)
    with torch.no_grad():  # tokens 0-9 prefer expert 0 then 1; tokens 10-19 prefer expert 1 then 0
        gate.wg.weight.zero_()
        gate.wg.weight[0, 0], gate.wg.weight[1, 0] = 50.0, 49.0
        gate.wg.weight[0, 1], gate.wg.weight[1, 1] = 49.0, 50.0
    x = torch.zeros(20, 8)
    x[:10, 0] = 1.0
    x[10:, 1] = 1.0
    gate.eval()
    routes = route(gate, x)
    capacity = math.ceil(20 / 4 * 0.25 * 2)
    assert int(routes.capacity) == capacity == 3
    first, second = routes.indices_KS
    assert first[:3].tolist() == [0, 0, 0] and first[10:13].tolist() == [1, 1, 1]
    assert bool((second == -1).all()), "second choices come after every first choice"


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_capacity_is_the_largest_load(k):
    gate = make_gate(k=k, drop_tokens=False, min_capacity=0)
    routes = route(gate, torch.randn(64, 8))
    assert int(routes.capacity) == int(routes.exp_counts.max())
    assert bool((routes.indices_KS >= 0).all())


def test_used_token_masks_routes_and_counts():
    gate = make_gate(k=2, drop_tokens=False)
    x = torch.randn(30, 8)
    used = torch.ones(30)
    used[::3] = 0
    masked = route(gate, x, used_token=used)
    full = route(gate, x)
    assert bool((masked.indices_KS[:, ::3] == -1).all())
    assert bool((masked.gates_KS[:, ::3] == 0).all())
    assert int(masked.exp_counts.sum()) == 2 * 20
    keep = used.bool()
    assert torch.equal(masked.indices_KS[:, keep], full.indices_KS[:, keep])


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_and_z_loss_follow_their_formulas(k):
    gate = make_gate(k=k, z_loss_coef=0.01)
    x = torch.randn(50, 8)
    routes = route(gate, x)
    logits = F.linear(x, gate.wg.weight).double()
    probs = torch.softmax(logits, dim=1)
    fraction = torch.bincount(routes_experts(gate, x), minlength=4).double() / (50 * k)
    balance = 4 * (probs.mean(0) * fraction).sum()
    z_loss = (torch.logsumexp(logits, dim=1)**2).mean()
    assert routes.l_aux.item() == pytest.approx((balance + 0.01 * z_loss).item(), rel=1e-5)
    assert gate.terms.balance.item() == pytest.approx(balance.item(), rel=1e-5)
    assert gate.terms.z.item() == pytest.approx(z_loss.item(), rel=1e-5)
    weighted = make_gate(k=k, z_loss_coef=0.01, balance_coef=0.1)
    assert route(weighted, x).l_aux.item() == pytest.approx((0.1 * balance + 0.01 * z_loss).item(), rel=1e-5)


@pytest.mark.parametrize("k, jitter", [(1, "Jitter"), (2, None)])
@pytest.mark.parametrize("training, sparse", [(True, True), (False, True), (True, False)])
def test_the_baseline_gate_routes_exactly_as_deepspeeds_topkgate(k, jitter, training, sparse):
    torch.manual_seed(0)
    stock = TopKGate(8, 4, k=k, capacity_factor=1.0, min_capacity=2, noisy_gate_policy=jitter).train(training)
    baseline = BaselineGate.from_topk_gate(stock, balance_coef=0.01).train(training)
    assert baseline.wg is stock.wg and baseline.noisy_gate_policy == jitter
    x = torch.randn(40, 8)
    torch.manual_seed(5)  # input jitter and the 2nd expert's sampling draw from the global RNG
    want = stock(x, None, sparse)
    torch.manual_seed(5)
    got = baseline(x, None, sparse)
    assert len(got) == len(want)
    assert got[0].item() == pytest.approx(0.01 * want[0].item(), rel=1e-6), "l_aux carries balance_coef"
    assert baseline.terms.balance.item() == want[0].item() and baseline.terms.z.item() == 0.0
    for g, w in zip(got[1:], want[1:]):
        assert g == w if isinstance(w, int) else torch.equal(g, w)


def switch_balance(logits, counts, routes):
    """Switch's balance loss written out in float64: E * sum_e mean_s softmax(logits)_e * counts_e / routes."""
    probs = torch.softmax(logits.double(), dim=1)
    return logits.shape[1] * (probs.mean(0) * counts.double() / routes).sum()


@pytest.mark.parametrize("k", [1, 2])
def test_local_balance_keeps_its_values(k):
    """The balance term now comes from sparsemixer_ds.routing.balance: explicit "local" is the default, and both
    are Switch's formula over the routes SparseMixer drew (S * k of them)."""
    x = torch.randn(50, 8)
    default = route(make_gate(k=k, z_loss_coef=0.01), x)
    gate = make_gate(k=k, z_loss_coef=0.01, balance="local")
    local = route(gate, x)
    assert torch.equal(local.l_aux, default.l_aux) and torch.equal(local.exp_counts, default.exp_counts)
    balance = switch_balance(F.linear(x, gate.wg.weight), torch.bincount(routes_experts(gate, x), minlength=4),
                             50 * k)
    assert gate.terms.balance.item() == pytest.approx(balance.item(), rel=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_global_balance_is_local_without_a_process_group(k):
    x = torch.randn(50, 8)
    local_gate, global_gate = make_gate(k=k, z_loss_coef=0.01), make_gate(k=k, z_loss_coef=0.01, balance="global")
    local, glob = route(local_gate, x), route(global_gate, x)
    assert torch.equal(glob.l_aux, local.l_aux) and torch.equal(global_gate.terms.balance, local_gate.terms.balance)
    assert torch.equal(glob.indices_KS, local.indices_KS) and torch.equal(glob.gates_KS, local.gates_KS)
    assert "balance='global'" in repr(global_gate)


def test_an_unknown_balance_mode_is_refused_naming_it():
    match = "balance must be one of local, global .*got 'median'"
    with pytest.raises(ValueError, match=match):
        SparseMixerGate(8, 4, balance="median")
    with pytest.raises(ValueError, match=match):
        SparseMixerMoE(8, torch.nn.Linear(8, 8), num_experts=4, balance="median")
    with pytest.raises(ValueError, match=match):
        BaselineGate.from_topk_gate(TopKGate(8, 4, k=1), balance="median")
    for router in ("sparsemixer", "switch"):
        with pytest.raises(ValueError, match=match):
            make_moe(get_router(router), 8, torch.nn.Linear(8, 8), num_experts=4,
                     options=RouterOptions(balance="median"))
    model = TinyMoEModel()
    with pytest.raises(ValueError, match=match):
        convert(model, balance="median")
    assert not any(isinstance(m, SparseMixerMoE) for m in model.modules())


@pytest.mark.parametrize("router, k", [("sparsemixer", 1), ("sparsemixer-v2", 2), ("switch", 1), ("gshard", 2)])
def test_moe_balance_reaches_every_gate_of_the_model(router, k):
    cfg = load_config(None, ["model.vocab_size=50", "model.d_model=16", "model.n_heads=2", "model.n_layers=2",
                             "model.seq_len=8", "moe.num_experts=4", "moe.expert_hidden=16", f"moe.router={router}",
                             f"moe.top_k={k}", "moe.balance=global"])
    gates = MoELM(cfg.model, cfg.moe).gates
    assert gates and all(gate.options.balance == "global" for gate in gates)


def test_convert_passes_the_balance_mode():
    model = TinyMoEModel()
    convert(model, balance="global")
    assert [m.gate.options.balance for m in model.modules() if isinstance(m, SparseMixerMoE)] == ["global", "global"]


def deepspeed_first_choice_balance(logits):
    """top2gating's l_aux written out: E * sum_e P_e * (share of tokens whose argmax is e)."""
    first = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    return switch_balance(logits, first, logits.shape[0])


@pytest.mark.parametrize("k, jitter", [(1, "Jitter"), (2, None)])
@pytest.mark.parametrize("sparse", [True, False])
def test_the_baseline_gates_global_balance_on_one_process(k, jitter, sparse):
    """Global balance keeps DeepSpeed's routes. On one process it is Switch's formula over all k routes
    (DeepSpeed's exp_counts over S * k): for k = 1 that is DeepSpeed's own l_aux; for k = 2 DeepSpeed's
    l_aux counts first choices only (over S), and the global value is not it."""
    torch.manual_seed(0)
    stock = TopKGate(8, 4, k=k, capacity_factor=1.0, min_capacity=2, noisy_gate_policy=jitter)
    local = BaselineGate.from_topk_gate(stock, balance_coef=0.01)
    glob = BaselineGate.from_topk_gate(stock, balance_coef=0.01, balance="global")
    glob.stats.recording = True
    x = torch.randn(40, 8) * 4  # spread logits: second choices do not mirror first ones
    torch.manual_seed(5)
    want = local(x, None, sparse)
    torch.manual_seed(5)
    input_fp32 = x if jitter is None else multiplicative_jitter(x, device=x.device)  # the gate's draw
    logits = F.linear(input_fp32, stock.wg.weight).detach()
    torch.manual_seed(5)
    got = glob(x, None, sparse)
    for g, w in zip(got[1:], want[1:]):
        assert g == w if isinstance(w, int) else torch.equal(g, w)
    exp_counts = got[-1]
    assert int(exp_counts.sum()) == 40 * k
    expect = switch_balance(logits, exp_counts, 40 * k)
    assert glob.terms.balance.item() == pytest.approx(expect.item(), rel=1e-5)
    assert got[0].item() == pytest.approx(0.01 * expect.item(), rel=1e-5)
    deepspeed = local.terms.balance.item()
    assert deepspeed == pytest.approx(deepspeed_first_choice_balance(logits).item(), rel=1e-5)
    if k == 1:
        assert glob.terms.balance.item() == pytest.approx(deepspeed, rel=1e-6)
    else:  # the mean of DeepSpeed's first-choice term and the same term over the second choices
        second = exp_counts - torch.bincount(logits.argmax(dim=1), minlength=4)
        halfway = (deepspeed + switch_balance(logits, second, 40).item()) / 2
        assert glob.terms.balance.item() == pytest.approx(halfway, rel=1e-5)
        assert abs(glob.terms.balance.item() - deepspeed) > 1e-3
    got[0].backward()
    assert glob.wg.weight.grad.abs().sum() > 0, "the global balance loss trains the router"
    stats = glob.stats.take(torch.device("cpu"))
    assert torch.allclose(stats[:4], exp_counts.double() / (40 * k)), "statistics read the counts DeepSpeed returns"


def test_building_a_baseline_gate_draws_no_random_numbers():
    stock = TopKGate(8, 4, k=1)
    torch.manual_seed(9)
    BaselineGate.from_topk_gate(stock)
    after = torch.rand(3)
    torch.manual_seed(9)
    assert torch.equal(after, torch.rand(3))


def routes_experts(gate, x):
    torch.manual_seed(11)
    return sparsemixer(F.linear(x, gate.wg.weight), top_k=gate.k)[0].flatten()


@pytest.mark.parametrize("estimator, k", [("midpoint", 1), ("heun3", 2)])
def test_moe_layer_output_is_the_weighted_sum_of_chosen_experts(estimator, k):
    layer = sparsemixer_layer(model_dim=16, num_experts=4, k=k, estimator=estimator, capacity_factor=0.75,
                              min_capacity=1)
    with torch.no_grad():
        if layer.omega is not None:
            layer.omega.uniform_(0.5, 1.5)
    x = torch.randn(3, 10, 16)
    torch.manual_seed(21)
    out, l_aux, exp_counts = layer(x)
    torch.manual_seed(21)
    routes = layer.gate(x.reshape(-1, 16), None, True)
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    expect = torch.zeros(30, 16)
    tokens = x.reshape(-1, 16)
    for s in range(30):
        for j in range(k):
            e = int(routes.indices_KS[j, s])
            if e >= 0:
                expect[s] += routes.gates_KS[j, s] * experts[e](tokens[s])
    if layer.omega is not None:
        expect = expect * layer.omega
    assert torch.allclose(out.reshape(30, 16), expect, atol=1e-5)
    assert torch.equal(exp_counts, routes.exp_counts) and torch.equal(l_aux, routes.l_aux)
    assert int((routes.indices_KS < 0).sum()) > 0, "the case must drop routes"


@pytest.mark.parametrize("k", [1, 2])
def test_dense_contract_gives_the_same_layer_output_as_the_sparse_one(k):
    """Older MOELayers (and inference) dispatch with the dense einsums; both must agree."""
    layer = sparsemixer_layer(model_dim=16, num_experts=4, k=k, capacity_factor=0.75, min_capacity=1)
    x = torch.randn(24, 16)
    torch.manual_seed(5)
    sparse_out = layer.deepspeed_moe(x, None)
    torch.manual_seed(5)
    _, combine, dispatch, _ = layer.gate(x)
    dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), x)
    expert_out = torch.stack([expert(dispatched[e]) for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts)])
    dense_out = torch.einsum("sec,ecm->sm", combine, expert_out)
    assert torch.allclose(sparse_out, dense_out, atol=1e-5)


def test_router_and_omega_get_gradients_through_the_layer():
    layer = sparsemixer_layer(model_dim=16, num_experts=4, k=1)
    out, l_aux, _ = layer(torch.randn(2, 12, 16))
    (out.square().sum() + l_aux).backward()
    assert layer.gate.wg.weight.grad.abs().sum() > 0
    assert layer.omega.grad.abs().sum() > 0


def test_heun3_layer_has_no_omega():
    assert sparsemixer_layer(estimator="heun3").omega is None


@pytest.mark.parametrize("kwargs, name", [
    ({"k": 5}, "k"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
    ({"min_capacity": -1}, "min_capacity"),
    ({"noisy_gate_policy": "Jitter"}, "noisy_gate_policy"),
    ({"top2_2nd_expert_sampling": False}, "top2_2nd_expert_sampling"),
    ({"jitter_eps": -1.0}, "jitter_eps"),
    ({"estimator": "straight-through"}, "estimator"),
    ({"z_loss_coef": -0.1}, "z_loss_coef"),
    ({"routing_impl": "triton"}, "routing_impl"),
])
def test_bad_gate_options_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SparseMixerGate(8, 4, **kwargs)
    with pytest.raises(ValueError, match=name):
        SparseMixerMoE(8, torch.nn.Linear(8, 8), num_experts=4, **kwargs)


def test_moe_rejects_experts_not_divisible_by_ep_size():
    with pytest.raises(ValueError, match="ep_size"):
        SparseMixerMoE(8, torch.nn.Linear(8, 8), num_experts=6, ep_size=4)


def test_convert_keeps_weights_experts_and_residual_parts():
    torch.manual_seed(0)
    model = TinyMoEModel()
    stock = [m for m in model.modules() if isinstance(m, MoE)]
    kept = {id(p) for p in model.parameters()}
    routers = [m.deepspeed_moe.gate.wg.weight for m in stock]
    settings = [(m.deepspeed_moe.gate.k, m.deepspeed_moe.gate.capacity_factor, m.deepspeed_moe.gate.min_capacity,
                 m.deepspeed_moe.gate.drop_tokens) for m in stock]
    assert convert(model, estimator="midpoint", jitter_eps=0.2) == 2
    for layer, router, setting in zip(stock, routers, settings):
        assert type(layer) is SparseMixerMoE and isinstance(layer, MoE)
        gate = layer.deepspeed_moe.gate
        assert type(gate) is SparseMixerGate and isinstance(gate, TopKGate)
        assert gate.wg.weight is router
        assert (gate.k, gate.capacity_factor, gate.min_capacity, gate.drop_tokens) == setting
        assert gate.options.jitter_eps == 0.2 and gate.options.estimator == "midpoint"
        assert torch.equal(layer.omega, torch.ones(16))
    new = {id(p) for p in model.parameters()}
    assert kept < new and len(new - kept) == 2, "only the two omegas are new"
    assert hasattr(stock[1], "mlp") and hasattr(stock[1], "coefficient")
    logits, aux = model(torch.randint(0, 32, (2, 8)))
    assert logits.shape == (2, 8, 32) and aux.requires_grad
    assert convert(model) == 0, "converted layers are left as they are"


def test_convert_refuses_a_model_without_moe_and_bad_options_change_nothing():
    with pytest.raises(ValueError, match="no deepspeed.moe.layer.MoE"):
        convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = TinyMoEModel()
    with pytest.raises(ValueError, match="estimator"):
        convert(model, estimator="reinmax")
    with pytest.raises(TypeError, match="unknown options"):
        convert(model, top_k=2)
    assert not any(isinstance(m, SparseMixerMoE) for m in model.modules())
