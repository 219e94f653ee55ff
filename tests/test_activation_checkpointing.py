"""train.activation_checkpointing: each block (native) or decoder layer (hf) runs again in the backward,
with the RNG state restored, so SparseMixer's draws and dropout repeat and training is unchanged.

Each check compares the same model with and without checkpointing, from the same seed: in one process
(the loss and every gradient of one step, and the gate calls that prove the recompute happened), and
launched on 2 ranks with expert parallelism (the logged losses of a few training steps).
"""
import json

import pytest
import torch
from conftest import REPO, run_metrics, set_args
from test_hf_family import launch, write_config

from sparsemixer_ds.config import load_config
from sparsemixer_ds.models.families import get_family
from sparsemixer_ds.routing.core import RoutingStats

NATIVE = ["model.vocab_size=50", "model.d_model=32", "model.n_heads=2", "model.n_layers=4", "model.seq_len=16",
          "model.ffn_hidden=64", "moe.num_experts=4", "moe.expert_hidden=32", "model.dropout=0.1",
          "moe.balance_coef=0.01", "moe.z_loss_coef=0.001"]
PHIMOE = {"model_type": "phimoe", "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
          "attention_dropout": 0.1}


def count_calls(modules):
    """A list whose length is the number of forward calls of ``modules`` from now on."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def one_step(model, gates, tokens, targets, seed=1234):
    """Loss, logged terms, gradients (name -> tensor), gate calls and routing statistics of one training
    forward and backward from ``seed``."""
    calls = count_calls(gates)
    stats = model.routing_stats()
    for s in stats:
        s.recording = True
    torch.manual_seed(seed)
    out = model(tokens, targets)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    routing = [RoutingStats.summarize(s.take(torch.device("cpu"))) for s in stats]
    return out, grads, len(calls), routing


def assert_same_step(plain, checkpointed, layers):
    (out_a, grads_a, calls_a, routing_a), (out_b, grads_b, calls_b, routing_b) = plain, checkpointed
    assert calls_a == layers and calls_b == 2 * layers, "each gate runs again in the backward, and only there"
    for key in ("loss", "ce", "balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(out_b, key), getattr(out_a, key), rtol=1e-6, atol=0, msg=key)
    assert set(grads_b) == set(grads_a) and len(grads_a) > 10
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # The recompute adds a second, equal row to each gate's statistics: the means are the same.
    for a, b in zip(routing_a, routing_b):
        assert b["load"] == pytest.approx(a["load"], abs=1e-12) and b["entropy"] == pytest.approx(a["entropy"])


@pytest.mark.parametrize("router,k", [("sparsemixer", 1), ("sparsemixer-v2", 2)], ids=["midpoint-top1", "heun3-top2"])
def test_native_checkpointed_step_equals_the_plain_one(router, k):
    runs = []
    for flag in (False, True):
        cfg = load_config(None, NATIVE + [f"moe.router={router}", f"moe.top_k={k}",
                                          f"train.activation_checkpointing={str(flag).lower()}"])
        torch.manual_seed(0)
        model = get_family(cfg).build(cfg)
        assert model.checkpoint_blocks is flag
        tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(5))
        runs.append(one_step(model, model.gates, tokens[:, :-1], tokens[:, 1:]))
    assert_same_step(*runs, layers=2)
    # The gradients depend on the draws (another seed, other ones): a recompute that drew anew would show.
    model.zero_grad()
    _, other, _, _ = one_step(model, [], tokens[:, :-1], tokens[:, 1:], seed=99)
    name = "blocks.1.ffn.deepspeed_moe.gate.wg.weight"
    assert (other[name] - runs[1][1][name]).abs().max() > 1e-4


def test_hf_phimoe_checkpointed_step_equals_the_plain_one(world_of_one):
    import deepspeed
    from transformers.modeling_layers import GradientCheckpointingLayer

    from sparsemixer_ds.models import autoep
    modules = []
    for flag in (False, True):
        cfg = load_config(None, ["model.family=hf", f"model.hf={json.dumps(PHIMOE)}", "model.vocab_size=50",
                                 "model.seq_len=16", "moe.router=sparsemixer-v2", "moe.ep_size=1",
                                 "moe.balance_coef=0.01", f"train.activation_checkpointing={str(flag).lower()}"])
        family = get_family(cfg)
        ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}
        ds.update(family.ds_config(cfg, ds, "the test"))
        torch.manual_seed(0)
        engine, *_ = deepspeed.initialize(model=family.build(cfg), config=ds)
        autoep.install_routers(engine.module)
        layers = [m for m in engine.module.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(layers) == 2 and all(m.gradient_checkpointing is flag for m in layers)
        modules.append(engine.module.train())
    modules[1].load_state_dict(modules[0].state_dict())  # the same weights, whatever initialize drew
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(5))
    runs = [one_step(m, autoep.routers(m), tokens[:, :-1], tokens[:, 1:]) for m in modules]
    assert_same_step(*runs, layers=2)


def test_launched_runs_log_the_same_losses_with_checkpointing(tmp_path, corpus):
    """2 ranks, ep_size 2, global balance, 4 steps: native with midpoint routing and dropout, PhiMoE with
    heun3; checkpointed runs log the losses the plain runs log."""
    native = set_args(f"data.path={corpus}", "train.steps=4", "eval.interval=100", "checkpoint.interval=0",
                      "moe.balance=global", "model.dropout=0.1", "moe.balance_coef=0.01")
    phimoe = write_config(tmp_path, corpus, "phimoe", train={"steps": 4}, eval={"interval": 100},
                          checkpoint={"interval": 0})
    for name, config, extra in (("native", REPO / "configs" / "cpu_small.yaml", native),
                                ("phimoe", phimoe, [])):
        logged = []
        for flag in ("false", "true"):
            run_dir = tmp_path / f"{name}-{flag}"
            launch(config, *extra, "--set", f"run_dir={run_dir}", "--set", f"train.activation_checkpointing={flag}")
            logged.append([m for m in run_metrics(run_dir) if "loss" in m])
        plain, checkpointed = logged
        assert [m["step"] for m in plain] == [m["step"] for m in checkpointed] == [1, 2, 3, 4]
        for a, b in zip(plain, checkpointed):
            for key in ("loss", "balance_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
