"""train.compile: the trainer compiles the model (DeepSpeed's engine.compile: torch.compile, inductor) after
deepspeed.initialize. A compiled step computes what the eager one does, and a launched run trains with it.

Compiling takes tens of seconds on 2 CPU cores: the models are tiny, and each is compiled once.
"""

import pytest
import torch
import torch._inductor.config
from conftest import REPO, run_metrics, set_args
from test_hf_family import launch

from sparsemixer_ds.config import load_config
from sparsemixer_ds.models.families import get_family

NATIVE = ["model.vocab_size=50", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=16",
          "model.ffn_hidden=64", "moe.num_experts=4", "moe.expert_hidden=32", "moe.moe_every=1", "moe.top_k=2",
          "moe.router=sparsemixer-v2", "moe.balance_coef=0.01", "moe.z_loss_coef=0.001"]
# One rank, ZeRO-0: the engine's backward is a plain one (an optimizer is there because engine.backward wants one).
DS = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}


def test_compiled_engine_step_equals_the_eager_one(world_of_one):
    import deepspeed
    cfg = load_config(None, NATIVE)
    tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(5))
    steps = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = get_family(cfg).build(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS)
        if compiled:
            engine.compile()
            assert engine.is_compiled
        torch.manual_seed(7)
        # Inductor draws random numbers with its own generator; fallback_random makes it call PyTorch's, so that
        # the compiled step routes as the eager one did and the two can be compared number for number.
        with torch._inductor.config.patch(fallback_random=True):
            out = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(out.loss)
        grads = {name: p.grad for name, p in engine.module.named_parameters()}
        steps.append((out, grads))
    (eager, eager_grads), (comp, comp_grads) = steps
    for key in ("loss", "ce", "balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(comp, key), getattr(eager, key), rtol=1e-5, atol=1e-6, msg=key)
    assert set(comp_grads) == set(eager_grads) and all(g is not None for g in comp_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_launched_compiled_run_trains_like_the_eager_one(tmp_path, corpus):
    """2 ranks, ep_size 2, 3 steps. Compiled routes come from inductor's generator (other numbers), so the
    losses are close to the eager run's, not equal."""
    args = set_args(f"data.path={corpus}", "train.steps=3", "eval.interval=100", "checkpoint.interval=0")
    logged = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / f"compile-{flag}"
        proc = launch(REPO / "configs" / "cpu_small.yaml", *args, "--set", f"run_dir={run_dir}", "--set",
                      f"train.compile={flag}")
        logged[flag] = [m for m in run_metrics(run_dir) if "loss" in m]
    eager, compiled = logged["false"], logged["true"]
    assert [m["step"] for m in compiled] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in compiled)
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=2e-3)
    assert compiled[-1]["loss"] < compiled[0]["loss"], "the compiled model trains"
    # Dynamo traced the model: it reports the graph break DeepSpeed's MoE layer makes (sharded_moe.py).
    assert "C = int(C)" in proc.stderr
