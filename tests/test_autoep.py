"""SparseMixer routers in DeepSpeed's AutoEP layers (sparsemixer_ds.models.autoep).

Two launches of tests/dist/autoep_check.py (ZeRO-2, ZeRO-3) on 2 CPU ranks with autoep_size 2 feed the
distributed tests; each is checked against a one-process reference: Hugging Face's own PhiMoE, a
hand-written SparseMixer MoE block, the estimator's gradient formula in float64, Switch's balance loss
from both ranks' routes. The refusals run in this process, with no process group.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, free_port, launch_env
from transformers import AutoModelForCausalLM, MixtralConfig, PhimoeConfig, Qwen3MoeConfig

from sparsemixer_ds.models import autoep
from sparsemixer_ds.routing.estimator import sparsemixer
from sparsemixer_ds.routing.registry import RouterOptions

CONFIG_CLASSES = {"phimoe": PhimoeConfig, "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig}
# The estimators' constants from the papers, not from routing/registry.py: s multiplies the router gradient,
# c_low is the forward scale of a draw that loses the coin.
PAPER = {"midpoint": {"s": 2.0, "c_low": 0.5}, "heun3": {"s": 1.0, "c_low": 1.0 / 3.0}}
# The PhiMoE engines each launch builds: (stage, name) -> (use_grouped_mm, estimator, balance).
PHIMOE_ENGINES = {
    (2, "grouped_heun3_global"): (True, "heun3", "global"),
    (2, "loop_midpoint_local"): (False, "midpoint", "local"),
    (3, "grouped_midpoint_local"): (True, "midpoint", "local"),
    (3, "loop_heun3_global"): (False, "heun3", "global"),
}
ENGINE_IDS = [f"zero{stage}-{name}" for stage, name in PHIMOE_ENGINES]


def launch(out, stage: int):
    """Both ranks' results of one launch. Module-scoped (conftest's deepspeed_run is per test): one
    launch feeds every test of its stage."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / "autoep_check.py"), "--out", str(out), "--stage", str(stage)]
    proc = subprocess.run(cmd, env=launch_env(), cwd=out, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log}"
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("autoep_zero2"), 2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("autoep_zero3"), 3)


def run_of(request, stage: int):
    return request.getfixturevalue(f"zero{stage}")


def hf_model(out, family: str):
    """The launch's model in one process: its config and the initial weights rank 0 saved, eval mode."""
    config = CONFIG_CLASSES[family].from_dict(json.loads((out / f"{family}.json").read_text()))
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(torch.load(out / f"{family}_init.pt", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Eval: the AutoEP model's logits against one-process references
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,name", list(PHIMOE_ENGINES), ids=ENGINE_IDS)
def test_phimoe_eval_logits_equal_hugging_face_phimoe_in_one_process(request, stage, name):
    out, ranks = run_of(request, stage)
    ref = hf_model(out, "phimoe")  # HF's own routing: in eval, SparseMixer's eval rule
    for rank, got in enumerate(ranks):
        with torch.no_grad():
            want = ref(input_ids=got[name]["eval_tokens"]).logits
        torch.testing.assert_close(got[name]["eval_logits"], want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"rank {rank}, {name}, ZeRO-{stage}: {m}")
        assert got[name]["routers"] == ["SparseMixerRouter", "SparseMixerRouter"]
    # The comparison sees the routing weights: HF with a tighter jitter mask gives other logits.
    for block in (layer.mlp for layer in ref.model.layers):
        block.router.router_jitter_noise = 0.01
    with torch.no_grad():
        other = ref(input_ids=ranks[0][name]["eval_tokens"]).logits
    assert (other - ranks[0][name]["eval_logits"]).abs().max() > 1e-3


def sparsemixer_block(block, top_k: int, jitter_eps: float):
    """A forward for an HF Mixtral / Qwen3-MoE block: SparseMixer's eval routing, written out."""
    def forward(hidden_states):
        x_TM = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE = F.linear(x_TM, block.gate.weight).float()
        experts_TK, weights_TK = sparsemixer(logits_TE, top_k, jitter_eps, training=False)
        out_TM = torch.zeros_like(x_TM)
        for k in range(top_k):  # each token through its k-th expert, weighted, no renormalisation
            w1_TIM = block.experts.gate_up_proj[experts_TK[:, k]]  # [T, 2I, M]
            w2_TMI = block.experts.down_proj[experts_TK[:, k]]  # [T, M, I]
            gate_TI, up_TI = torch.einsum("tim,tm->ti", w1_TIM, x_TM).chunk(2, dim=-1)
            out_TM += weights_TK[:, k:k + 1] * torch.einsum("tmi,ti->tm", w2_TMI, F.silu(gate_TI) * up_TI)
        return out_TM.reshape(hidden_states.shape)
    return forward


@pytest.mark.parametrize("stage,family", [(2, "mixtral"), (3, "qwen3_moe")])
def test_preset_eval_logits_equal_a_hand_written_sparsemixer_moe(request, stage, family):
    out, ranks = run_of(request, stage)

    def reference(tokens, jitter_eps):
        model = hf_model(out, family)
        assert model.config.hidden_act == "silu"
        for layer in model.model.layers:
            layer.mlp.forward = sparsemixer_block(layer.mlp, model.config.num_experts_per_tok, jitter_eps)
        with torch.no_grad():
            return model(input_ids=tokens).logits

    for rank, got in enumerate(ranks):
        run = got[family]
        # No option given: SparseMixer's own jitter_eps; Mixtral's router_jitter_noise is its input jitter.
        want_options = {"jitter_eps": 0.1, "input_jitter": 0.05 if family == "mixtral" else 0.0}
        for options in run["options"]:
            assert {key: options[key] for key in want_options} == want_options
        torch.testing.assert_close(run["eval_logits"], reference(run["eval_tokens"], 0.1), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"rank {rank}, {family}, ZeRO-{stage}: {m}")
    # jitter_eps 0 (a mask of everything but the argmax, weights of 1) is visibly another model.
    assert (reference(ranks[0][family]["eval_tokens"], 0.0) - ranks[0][family]["eval_logits"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Training: the router gradient, omega, the balance loss, resume
# ---------------------------------------------------------------------------------------------------------

def round_probs(logits_TE, experts_TK, jitter_eps):
    """Each round's jitter-masked softmax (float64): earlier rounds' experts removed, the mask taken
    relative to the remaining maximum: z is out where (m - z) / max(|z|, m) > 2 eps."""
    z = logits_TE.double()
    removed = torch.zeros_like(z, dtype=torch.bool)
    probs = []
    for k in range(experts_TK.shape[1]):
        m = z.masked_fill(removed, float("-inf")).max(dim=1, keepdim=True).values
        keep = ~removed & ((m - z) <= 2 * jitter_eps * torch.maximum(z.abs(), m))
        probs.append(torch.softmax(z.masked_fill(~keep, float("-inf")), dim=1))
        removed = removed | F.one_hot(experts_TK[:, k], z.shape[1]).bool()
    return probs


def fractions(captures, balance: str, rank: int):
    """f_e: the share of routes that went to expert e, over this rank's routes or both ranks'."""
    used = captures if balance == "global" else [captures[rank]]
    counts = sum(torch.bincount(c["experts"].reshape(-1), minlength=c["logits"].shape[1]).double() for c in used)
    return counts / sum(c["experts"].numel() for c in used)


def switch_balance(logits_TE, f_E):
    """Switch's balance loss E * sum_e P_e f_e (float64)."""
    return logits_TE.shape[1] * (torch.softmax(logits_TE.double(), dim=1).mean(dim=0) * f_E).sum()


@pytest.mark.parametrize("stage,name", list(PHIMOE_ENGINES), ids=ENGINE_IDS)
def test_router_gradient_is_the_estimators_formula_for_the_draws_made(request, stage, name):
    _, ranks = run_of(request, stage)
    _, estimator, balance = PHIMOE_ENGINES[stage, name]
    s, c_low = PAPER[estimator]["s"], PAPER[estimator]["c_low"]
    captures = [got[name]["capture"] for got in ranks]
    options = ranks[0][name]["options"][0]
    assert options["estimator"] == estimator and options["jitter_eps"] == 0.3  # PhiMoE's router_jitter_noise
    mixed = 0
    for rank, c in enumerate(captures):
        logits, experts, g = c["logits"], c["experts"], c["grad_weights"].double()
        probs = round_probs(logits, experts, options["jitter_eps"])
        want = torch.zeros_like(probs[0])
        for k, p_TE in enumerate(probs):
            onehot = F.one_hot(experts[:, k], p_TE.shape[1]).double()
            p_chosen = p_TE.gather(1, experts[:, k:k + 1]).squeeze(1)
            assert (p_chosen > 0).all(), f"rank {rank}: round {k} drew an expert its mask had removed"
            want += s * (g[:, k] * p_chosen)[:, None] * (onehot - p_TE)
            # The forward: c * p_D, c = 1 for the round's argmax and 1 or c_low otherwise.
            c_T = c["weights"][:, k].double() / p_chosen
            is_argmax = experts[:, k] == p_TE.argmax(dim=1)
            assert torch.allclose(c_T[is_argmax], torch.ones_like(c_T[is_argmax]), atol=1e-5)
            assert ((c_T - 1).abs().lt(1e-5) | (c_T - c_low).abs().lt(1e-5)).all(), f"rank {rank}: c = {c_T}"
            mixed += int(((p_chosen > 0.05) & (p_chosen < 0.95)).sum())
        # Plus the balance loss (coefficient 0.01): its gradient flows through P only, f is a constant.
        p_TE = torch.softmax(logits.double(), dim=1)
        f_E = fractions(captures, balance, rank)
        want += options["balance_coef"] * p_TE.shape[1] / p_TE.shape[0] * p_TE * (f_E - (p_TE * f_E).sum(1, True))
        got = c["grad_logits"].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m: f"rank {rank}, {name}, ZeRO-{stage}: {m}")
    assert mixed > 10, "the draws must include weights away from 0 and 1, or the check says little"


@pytest.mark.parametrize("stage,name", list(PHIMOE_ENGINES), ids=ENGINE_IDS)
def test_balance_loss_counts_this_ranks_routes_or_both_ranks(request, stage, name):
    _, ranks = run_of(request, stage)
    balance = PHIMOE_ENGINES[stage, name][2]
    captures = [got[name]["capture"] for got in ranks]
    apart = 0.0
    for rank, c in enumerate(captures):
        local = switch_balance(c["logits"], fractions(captures, "local", rank))
        global_ = switch_balance(c["logits"], fractions(captures, "global", rank))
        want = global_ if balance == "global" else local
        assert float(c["balance"]) == pytest.approx(float(want), rel=1e-5), \
            f"rank {rank}: balance {float(c['balance'])}, local {float(local)}, global {float(global_)}"
        apart = max(apart, abs(float(global_ - local)))
    assert apart > 1e-3, "the ranks' batches differ, so their routes do: local and global must differ"


@pytest.mark.parametrize("stage,name", list(PHIMOE_ENGINES), ids=ENGINE_IDS)
def test_midpoint_omega_is_in_the_optimizer_and_trains_heun3_has_none(request, stage, name):
    _, ranks = run_of(request, stage)
    estimator = PHIMOE_ENGINES[stage, name][1]
    want = {f"{block}_omega.omega" for block in ranks[0][name]["blocks"]} if estimator == "midpoint" else set()
    for rank, got in enumerate(ranks):
        run = got[name]
        assert set(run["omega_before"]) == want
        assert set(run["omega_in_optimizer"]) == want and all(run["omega_in_optimizer"].values())
        for key in want:
            assert torch.equal(run["omega_before"][key], torch.ones(32)), f"rank {rank}: {key} starts at 1"
            change = float((run["omega_after"][key] - 1).abs().max())  # no weight decay: only its gradient moves it
            assert change > 1e-4, f"rank {rank}: {key} moved only {change} in 3 steps at lr 1e-3"
            # A replicated parameter, its gradient averaged over the ranks: the same on both.
            torch.testing.assert_close(run["omega_after"][key], ranks[0][name]["omega_after"][key])


@pytest.mark.parametrize("estimator", ["heun3", "midpoint"])
def test_training_steps_are_the_same_under_zero2_and_zero3_with_grouped_gemm_or_not(zero2, zero3, estimator):
    # Same weights, batches, draws and balance mode; ZeRO-2 vs ZeRO-3 and the expert loop vs grouped GEMM
    # change only how the same sums are partitioned and ordered.
    (_, ranks2), (_, ranks3) = zero2, zero3
    name2, name3 = (name for (_, name), spec in PHIMOE_ENGINES.items() if spec[1] == estimator)
    for rank in range(2):
        assert ranks2[rank][name2]["losses"] == pytest.approx(ranks3[rank][name3]["losses"], rel=1e-5, abs=0), \
            f"rank {rank}: {name2} under ZeRO-2 vs {name3} under ZeRO-3"


def test_resume_from_checkpoint_repeats_the_losses_exactly_under_zero3(zero3):
    _, ranks = zero3
    for rank, got in enumerate(ranks):
        run = got["resume"]
        assert run["loaded_from"] != "None", f"rank {rank}: load_checkpoint found no checkpoint"
        assert run["loaded"] == run["saved"], f"rank {rank}: saved {run['saved']}, loaded {run['loaded']}"
        assert len(set(run["saved"])) == len(run["saved"]), "the steps' losses differ from each other"


# ---------------------------------------------------------------------------------------------------------
# Refusals and set-up, in this process (AutoEP's detection needs no process group)
# ---------------------------------------------------------------------------------------------------------

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
PHIMOE_EP = {"enabled": True, "autoep_size": 2, "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
             "router_pattern": "router", "expert_pattern": "experts", "expert_w1": "gate_up_proj",
             "expert_w2": "down_proj", "expert_w3": None, "score_func": "softmax"}


def phimoe(**config):
    return AutoModelForCausalLM.from_config(PhimoeConfig(num_local_experts=4, **{**SMALL, **config}))


@pytest.mark.parametrize("section,options,config,named", [
    ({**PHIMOE_EP, "enabled": False}, {}, {}, ["expert_parallel.enabled", "False"]),
    ({**PHIMOE_EP, "score_apply": "pre"}, {}, {}, ["score_apply", '"pre"']),
    ({**PHIMOE_EP, "route_norm": True}, {}, {}, ["route_norm", "true"]),
    ({**PHIMOE_EP, "route_scale": 2.0}, {}, {}, ["route_scale", "2.0"]),
    ({**PHIMOE_EP, "load_balance_coeff": 0.001}, {}, {}, ["load_balance_coeff", "0.001"]),
    ({**PHIMOE_EP, "num_expert_groups": 2}, {}, {}, ["num_expert_groups", "2"]),
    (PHIMOE_EP, {}, {"output_router_logits": True}, ["output_router_logits", "True"]),
    (PHIMOE_EP, {"estimator": "nope"}, {}, ["estimator", "'nope'"]),
    (PHIMOE_EP, {"balance": "nope"}, {}, ["balance", "'nope'"]),
    (PHIMOE_EP, {"jitter_eps": -0.1}, {}, ["jitter_eps", "-0.1"]),
    (PHIMOE_EP, {"input_jitter": 1.0}, {}, ["input_jitter", "1.0"]),
    (PHIMOE_EP, {"routing_impl": "triton"}, {}, ["routing_impl", "'triton'"]),
], ids=["not-enabled", "score_apply-pre", "route_norm", "route_scale", "load_balance_coeff", "num_expert_groups",
        "output_router_logits", "estimator", "balance", "jitter_eps", "input_jitter", "routing_impl"])
def test_use_sparsemixer_refuses_what_would_change_the_gradient_and_names_it(section, options, config, named):
    grouped = torch.distributed.is_initialized()  # an earlier test of this process may have made a world of one
    model = phimoe(**config)
    with pytest.raises(autoep.AutoEPError) as err:
        autoep.use_sparsemixer(model, {"expert_parallel": section}, **options)
    for word in named:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
    # Refused before anything was built: a corrected call still works on the same model.
    assert not any("omega" in name for name, _ in model.named_modules())
    model.config.output_router_logits = False
    assert autoep.use_sparsemixer(model, {"expert_parallel": PHIMOE_EP}) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert torch.distributed.is_initialized() == grouped, "use_sparsemixer starts no process group"


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_fused_router_routes_and_trains_as_the_eager_one(top_k):
    torch._dynamo.reset()
    x_TM = torch.randn(80, 16)
    results = []
    for impl in ("eager", "fused"):
        gate = torch.nn.Linear(16, 6, bias=False)
        torch.nn.init.normal_(gate.weight, generator=torch.Generator().manual_seed(3))
        router = autoep.SparseMixerRouter(gate, top_k, RouterOptions(routing_impl=impl))
        torch.manual_seed(4)
        weights_TK, experts_TK, counts_E = router(x_TM)
        (weights_TK * torch.arange(80.0)[:, None]).sum().add(router.l_aux).backward()
        results.append((weights_TK, experts_TK, counts_E, gate.weight.grad))
    eager, fused = results
    assert torch.equal(eager[1], fused[1]) and torch.equal(eager[2], fused[2])
    torch.testing.assert_close(fused[0], eager[0])
    torch.testing.assert_close(fused[3], eager[3])


def test_use_sparsemixer_refuses_an_unknown_option_by_name():
    with pytest.raises(TypeError, match="bogus"):
        autoep.use_sparsemixer(phimoe(), {"expert_parallel": PHIMOE_EP}, bogus=1)


def test_midpoint_adds_omega_before_initialize_and_routers_need_the_autoep_layers():
    model = phimoe()
    before = sum(p.numel() for p in model.parameters())
    autoep.use_sparsemixer(model, {"expert_parallel": PHIMOE_EP}, estimator="midpoint")
    omegas = {name: p for name, p in model.named_parameters() if "omega" in name}
    # In model.parameters(), which is what deepspeed.initialize builds the optimizer from.
    assert set(omegas) == {"model.layers.0.mlp_omega.omega", "model.layers.1.mlp_omega.omega"}
    assert all(torch.equal(p, torch.ones(32)) for p in omegas.values())
    assert sum(p.numel() for p in model.parameters()) == before + 2 * 32
    # Without deepspeed.initialize there is no AutoEP layer to put the router into: by hand or at the forward.
    tokens = torch.zeros(1, 4, dtype=torch.long)
    for attempt in (lambda: autoep.install_routers(model), lambda: model(input_ids=tokens)):
        with pytest.raises(autoep.AutoEPError, match=r"model\.layers\.0\.mlp is still a PhimoeSparseMoeBlock"):
            attempt()
    with pytest.raises(autoep.AutoEPError, match="already called"):
        autoep.use_sparsemixer(model, {"expert_parallel": PHIMOE_EP})
    with pytest.raises(autoep.AutoEPError, match="no SparseMixer blocks"):
        autoep.install_routers(phimoe())
