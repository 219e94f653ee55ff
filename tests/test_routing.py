"""The estimator against its specification, with an independent float64 reference of each round."""
import math

import numpy as np
import pytest
import torch

from sparsemixer_ds import sparsemixer
from sparsemixer_ds.routing import estimator as routing

# Every behaviour below holds for both implementations: eager PyTorch ops and the compiled (fused) path.
IMPLS = ["eager", "fused"]


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles afresh (from inductor's on-disk cache): tests use many expert counts, and past
    dynamo's recompile limit a compiled function would quietly run eagerly."""
    torch._dynamo.reset()

# The specification's constants (SparseMixer 2023; SparseMixer-v2 / GRIN 2024), written out here so
# that the tests do not read them from the code under test: (c_low, q, s, argmax draw exempt from the
# coin). sampled, euler and midpoint-all are the ablations of benchmarks/.
SPEC = {"midpoint": (0.5, 0.5, 2.0, True), "heun3": (1.0 / 3.0, 0.25, 1.0, True), "sampled": (1.0, 1.0, 1.0, True),
        "euler": (1.0, 1.0, 2.0, True), "midpoint-all": (0.5, 0.5, 2.0, False)}

# Upper 0.1% points of the chi-square distribution (standard tables), by degrees of freedom.
CHI2_999 = {3: 16.266, 5: 20.515, 11: 31.264, 19: 43.820}


def reference_probs(z_row, excluded, eps):
    """The masked softmax of one round, written out element by element in float64."""
    z = np.asarray(z_row, dtype=np.float64)
    live = [i for i in range(len(z)) if i not in excluded]
    m = max(z[i] for i in live)
    kept = []
    for i in live:
        gap, scale = m - z[i], max(abs(z[i]), m)
        if not (scale > 0 and gap / scale > 2 * eps):
            kept.append(i)
    p = np.zeros(len(z))
    total = sum(math.exp(z[i] - m) for i in kept)
    for i in kept:
        p[i] = math.exp(z[i] - m) / total
    return p


def reference_round_probs(logits, experts, eps):
    """p for every token and round, given the experts picked in earlier rounds: [S, K, E]."""
    z = logits.detach().double().numpy()
    out = np.zeros((z.shape[0], experts.shape[1], z.shape[1]))
    for s in range(z.shape[0]):
        for j in range(experts.shape[1]):
            out[s, j] = reference_probs(z[s], set(experts[s, :j].tolist()), eps)
    return out


def expected_grad(logits, experts, upstream, eps, s):
    """s * g * p_D * (onehot(D) - p), summed over rounds."""
    probs = reference_round_probs(logits, experts, eps)
    grad = np.zeros(logits.shape)
    for tok in range(logits.shape[0]):
        for j in range(experts.shape[1]):
            p = probs[tok, j]
            d = int(experts[tok, j])
            onehot = np.eye(logits.shape[1])[d]
            grad[tok] += s * float(upstream[tok, j]) * p[d] * (onehot - p)
    return grad


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_samples_follow_p(top_k, impl):
    # Close logits, so nothing is masked and every expert (or pair) is drawn often enough.
    row = torch.tensor([0.9, 1.0, 0.95, 0.85])
    tokens = 40000
    torch.manual_seed(0)
    experts, _ = sparsemixer(row.expand(tokens, -1), top_k=top_k, impl=impl)
    first = reference_probs(row.tolist(), set(), 0.1)
    if top_k == 1:
        expected = first
        observed = np.bincount(experts[:, 0].numpy(), minlength=4)
    else:  # P(D0 = a, D1 = b) = p_a * p'_b, p' the re-masked softmax without a
        expected = np.array([first[a] * reference_probs(row.tolist(), {a}, 0.1)[b]
                             for a in range(4) for b in range(4) if a != b])
        pair_ids = {(a, b): n for n, (a, b) in enumerate((a, b) for a in range(4) for b in range(4) if a != b)}
        observed = np.bincount([pair_ids[tuple(r)] for r in experts.tolist()], minlength=12)
    chi2 = float(((observed - tokens * expected) ** 2 / (tokens * expected)).sum())
    assert chi2 < CHI2_999[len(expected) - 1], (observed, tokens * expected)


@pytest.mark.parametrize("estimator", sorted(SPEC))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_value_is_c_times_p_with_the_coin_frequencies(estimator, impl):
    c_low, q, _, exempt = SPEC[estimator]
    torch.manual_seed(1)
    logits = torch.randn(20000, 6) * 0.3  # small spread: most experts survive the jitter mask
    experts, weights = sparsemixer(logits, top_k=1, estimator=estimator, impl=impl)
    probs = torch.from_numpy(reference_round_probs(logits, experts, 0.1))[:, 0]
    p_chosen = probs.gather(1, experts).squeeze(1)
    c = weights[:, 0].double() / p_chosen
    is_argmax = experts[:, 0] == probs.argmax(dim=1)
    if exempt:
        assert torch.allclose(c[is_argmax], torch.ones_like(c[is_argmax]), atol=1e-5)
    coined = c[~is_argmax] if exempt else c
    full = (coined - 1).abs() < 1e-5
    low = (coined - c_low).abs() < 1e-5
    assert bool((full | low).all()), "every coined weight is p_D or c_low * p_D"
    n = coined.numel()
    assert n > 2000, n
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(full.double().mean().item() - q) <= 4 * sigma


@pytest.mark.parametrize("estimator", sorted(SPEC))
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("jitter_eps", [0.1, 0.5])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_matches_the_formula(estimator, top_k, jitter_eps, impl):
    torch.manual_seed(2)
    logits = (torch.randn(64, 8, dtype=torch.float64) * 2).requires_grad_()
    upstream = torch.randn(64, top_k, dtype=torch.float32)
    experts, weights = sparsemixer(logits, top_k=top_k, jitter_eps=jitter_eps, estimator=estimator, impl=impl)
    (weights * upstream).sum().backward()
    want = expected_grad(logits, experts, upstream, jitter_eps, SPEC[estimator][2])
    np.testing.assert_allclose(logits.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).sum() > 0, "the check must see a non-zero router gradient"


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_eval_is_argmax_with_unit_scale(top_k, impl):
    torch.manual_seed(3)
    logits = torch.randn(128, 8)
    experts, weights = sparsemixer(logits, top_k=top_k, training=False, impl=impl)
    probs = reference_round_probs(logits, experts, 0.1)
    for j in range(top_k):
        np.testing.assert_array_equal(experts[:, j].numpy(), probs[:, j].argmax(axis=1))
        p_chosen = probs[np.arange(128), j, experts[:, j].numpy()]
        np.testing.assert_allclose(weights[:, j].numpy(), p_chosen, rtol=1e-6)
    # Eval draws no random numbers: the global RNG stream is untouched.
    state = torch.get_rng_state()
    sparsemixer(logits, top_k=top_k, training=False, impl=impl)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("impl", IMPLS)
def test_jitter_mask_removes_experts_jitter_could_never_promote(impl):
    # m = 10: (10 - 9) / 10 = 0.1 <= 0.2 stays; (10 - 7.5) / 10 = 0.25 and 13 / 10 are masked.
    row = torch.tensor([[10.0, 9.0, 7.5, -3.0]])
    torch.manual_seed(4)
    experts, weights = sparsemixer(row.expand(5000, -1), jitter_eps=0.1, impl=impl)
    assert set(experts[:, 0].tolist()) == {0, 1}
    _, eval_weights = sparsemixer(row, jitter_eps=0.1, training=False, impl=impl)
    assert eval_weights.item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
    # A wider eps keeps expert 2; eps = 0 keeps only the maximum, whose probability is then 1.
    wide, _ = sparsemixer(row.expand(5000, -1), jitter_eps=0.15, impl=impl)
    assert set(wide[:, 0].tolist()) == {0, 1, 2}
    _, only_max = sparsemixer(row, jitter_eps=0.0, training=False, impl=impl)
    assert only_max.item() == 1.0
    # m = z = 0 would be 0 / 0: such an expert is not masked.
    _, ties = sparsemixer(torch.zeros(1, 3), training=False, impl=impl)
    assert ties.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_leaves_input_alone_and_is_deterministic_under_a_seed(impl):
    logits = torch.randn(256, 8)
    before = logits.clone()
    torch.manual_seed(5)
    first = sparsemixer(logits, top_k=2, impl=impl)
    torch.manual_seed(5)
    second = sparsemixer(logits, top_k=2, impl=impl)
    assert torch.equal(logits, before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch.manual_seed(6)
    assert not torch.equal(first[0], sparsemixer(logits, top_k=2, impl=impl)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("impl", IMPLS)
def test_any_float_dtype_in_float32_weights_out(dtype, impl):
    logits = torch.randn(32, 4).to(dtype).requires_grad_()
    experts, weights = sparsemixer(logits, top_k=2, impl=impl)
    assert experts.dtype == torch.int64 and experts.shape == (32, 2)
    assert weights.dtype == torch.float32 and weights.shape == (32, 2)
    weights.sum().backward()
    assert logits.grad.dtype == dtype


@pytest.mark.parametrize("kwargs, name", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": 5}, "top_k"),
    ({"jitter_eps": -0.1}, "jitter_eps"),
    ({"estimator": "reinmax"}, "estimator"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sparsemixer(torch.randn(4, 4), **kwargs)


@pytest.mark.parametrize("logits", [torch.randn(4), torch.randn(2, 4, 4), torch.ones(4, 4, dtype=torch.int64)])
def test_logits_must_be_a_2d_float_tensor(logits):
    with pytest.raises(ValueError, match="logits"):
        sparsemixer(logits)


@pytest.mark.parametrize("estimator", ["midpoint", "heun3"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_fused_repeats_eager_draw_for_draw(estimator, top_k, training):
    """Same seed, same draws: the fused path consumes the random stream exactly as the eager one does
    (a resumed run repeats the uninterrupted one whichever runs), with the same weights and gradients."""
    runs = []
    for impl, tokens in (("eager", 300), ("fused", 300), ("eager", 77), ("fused", 77)):  # two token counts
        logits = (torch.randn(tokens, 12, generator=torch.Generator().manual_seed(tokens)) * 2).requires_grad_()
        upstream = torch.randn(tokens, top_k, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(9)
        experts, weights = sparsemixer(logits, top_k=top_k, estimator=estimator, training=training, impl=impl)
        (weights * upstream).sum().backward()
        runs.append((experts, weights.detach(), logits.grad, torch.get_rng_state()))
    for eager, fused in (runs[:2], runs[2:]):
        assert torch.equal(eager[0], fused[0])
        assert torch.equal(eager[3], fused[3]), "both draw the same number of random values"
        torch.testing.assert_close(fused[1], eager[1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused[2], eager[2], rtol=1e-5, atol=1e-7)
        assert eager[2].abs().sum() > 0


def test_the_fused_path_runs_compiled_code():
    """A guard against a quiet eager fallback: the fused call goes through dynamo and inductor."""
    from torch._dynamo.utils import counters
    counters.clear()
    logits = torch.randn(64, 8, requires_grad=True)
    sparsemixer(logits, top_k=2, impl="fused")[1].sum().backward()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # forward and backward


def test_auto_picks_fused_only_where_it_gains(monkeypatch):
    small = torch.zeros(routing.CPU_FUSED_MIN_LOGITS // 8 - 1, 8)
    large = torch.zeros(routing.CPU_FUSED_MIN_LOGITS // 8, 8)
    assert routing.use_fused("fused", small) and not routing.use_fused("eager", large)
    assert not routing.use_fused("auto", small)
    assert routing.use_fused("auto", large) == routing.compiler_available(torch.device("cpu"))
    # Inside an outer torch.compile the eager formulation is traced (that compile fuses it).
    assert torch.compile(lambda x: torch.tensor(routing.use_fused("fused", x)), fullgraph=True)(large).item() is False
    monkeypatch.setattr(routing, "_COMPILERS", {"cpu": False})
    assert not routing.use_fused("auto", large)


def test_unknown_or_uncompilable_impl_is_refused_naming_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of auto, eager, fused; got 'triton'"):
        sparsemixer(torch.randn(4, 4), impl="triton")
    monkeypatch.setattr(routing, "compiler_available", lambda device: False)
    with pytest.raises(ValueError, match=r"'fused' needs a C\+\+ compiler .* use 'auto'"):
        sparsemixer(torch.randn(4, 4), impl="fused")



def tied_rows(kind, tokens, experts):
    generator = torch.Generator().manual_seed(11)
    if kind == "all-zero":
        return torch.zeros(tokens, experts)
    if kind == "tied-max":  # two or three experts share the maximum, in varying places
        logits = torch.randn(tokens, experts, generator=generator) * 0.05
        top = torch.randint(0, experts, (tokens, 3), generator=generator)
        return logits.scatter(1, top, 1.0)
    # Router logits as a bf16 matmul leaves them: maxima tie in about one row in a hundred (E = 64).
    return (torch.randn(tokens, experts, generator=generator) * 4).to(torch.bfloat16)


@pytest.mark.parametrize("kind, num_experts", [("all-zero", 4), ("tied-max", 8), ("bf16", 64)])
@pytest.mark.parametrize("estimator", ["midpoint", "heun3"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_first_of_tied_maxima_is_exempt_from_the_coin(kind, num_experts, estimator, top_k, impl):
    """On tied logits a draw keeps full scale by the coin alone unless it is the first of the tied maxima
    (the references' argmax: SparseMixer v1, v2 and HF PhiMoE take torch.max's index): every weight
    against a float64 reference, with the coins the estimator drew replayed from the seed."""
    c_low, q, _, _ = SPEC[estimator]
    tokens = 30000 if kind == "bf16" else 4000  # bf16 rows tie at the maximum in about 1% of tokens
    logits = tied_rows(kind, tokens, num_experts)
    torch.manual_seed(12)
    experts, weights = sparsemixer(logits, top_k=top_k, estimator=estimator, impl=impl)
    torch.manual_seed(12)
    coins = torch.rand(top_k, tokens, 2).double().numpy()  # what the estimator draws first, in its order
    z = logits.double().numpy()
    rows = np.arange(tokens)
    tied_not_first = 0
    for j in range(top_k):
        if j:  # the earlier rounds' experts leave the race
            z = z.copy()
            z[rows, experts[:, j - 1].numpy()] = -np.inf
        m = z.max(axis=1, keepdims=True)
        gap, scale = m - z, np.maximum(np.abs(z), m)
        unmasked = np.exp(z - m) * ~(gap > 0.2 * scale)  # jitter_eps 0.1; gap = scale = 0 stays
        p = unmasked / unmasked.sum(axis=1, keepdims=True)
        d = experts[:, j].numpy()
        first = np.argmax(z, axis=1)  # numpy's argmax: the first of tied maxima
        c = np.where((d == first) | (coins[j, :, 1] < q), 1.0, c_low)
        np.testing.assert_allclose(weights[:, j].double().numpy(), c * p[rows, d], rtol=1e-5, atol=0)
        tied_not_first += int(((d != first) & (z[rows, d] == m[:, 0]) & (coins[j, :, 1] >= q)).sum())
    # The rows must test the rule: draws of a maximum other than the first that lost the coin.
    assert tied_not_first > 40, tied_not_first
