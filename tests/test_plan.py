"""sparsemixer-ds plan: its training-state bytes against a built DeepSpeed engine's tensors, its verdict on
the shipped GPU configs (which need no GPU: the planner only reads configs), and its refusals."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY_MODEL, launch_env

from sparsemixer_ds.cli import main
from sparsemixer_ds.config import ConfigError, load_config
from sparsemixer_ds.plan import GiB, activations, make_plan

# The shipped GPU configs and the world size each is meant for (gpu_multinode: 2 nodes of 8, its README table).
GPU_CONFIGS = [("gpu_single.yaml", 1), ("gpu_multinode.yaml", 16), ("gpu_grin.yaml", 32)]


@pytest.mark.parametrize("config, world", GPU_CONFIGS)
def test_each_shipped_gpu_config_fits_on_80_gb_gpus(config, world, capsys):
    assert main(["plan", "--config", str(REPO / "configs" / config), "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    assert f"fits: {world} ranks" in out and "GiB of 80.00 GiB per rank" in out


def test_the_plan_of_a_jittered_phimoe_does_not_claim_the_jitter_is_ignored():
    """DeepSpeed's AutoEP warns, per layer, that its router ignores router_jitter_noise; with the SparseMixer
    router in its place the jitter is applied, so the warning must not reach the user."""
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "plan", "--config",
                           str(REPO / "configs" / "gpu_grin.yaml"), "--world-size", "32"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "fits: 32 ranks" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "does not implement jitter" not in proc.stdout + proc.stderr


def test_a_plan_that_does_not_fit_exits_non_zero_and_says_what_to_change(capsys):
    args = ["plan", "--config", str(REPO / "configs" / "gpu_grin.yaml"), "--world-size", "32"]
    assert main(args + ["--device-memory-gb", "16"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "16.00 GiB" in err and "train.activation_checkpointing=true" in err


def test_the_vocabulary_is_required_when_neither_data_nor_config_gives_it(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match="model.vocab_size is 0 and .*meta.json does not exist; set model.vocab_size"):
        make_plan(cfg, 1, 80 * GiB)


def test_activation_formula_by_hand_and_checkpointing_keeps_less():
    cfg = load_config(None, TINY_MODEL + ["model.vocab_size=50", "moe.moe_every=1", "data.path=/nonexistent"])
    plan = make_plan(cfg, 1, 80 * GiB)
    M, w, H, E, T, B, Fe, V = 32, 4, 2, 4, 32, 4, 32, 50
    moe_layer = 2 * M * w + 5 * M * w + 4 * H + 8 * E + 1.25 * (4 * M + 2 * Fe) * w
    assert plan.activations_full == int((2 * moe_layer + M * w + V * (w + 8)) * B * T)
    assert plan.activations_checkpointed == int((2 * M * w + moe_layer + M * w + V * (w + 8)) * B * T)
    assert plan.activations == plan.activations_full  # train.activation_checkpointing is off
    assert activations(plan.cost, 8, w, 1.25, False) == pytest.approx(2 * plan.activations_full, abs=1)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("family", ["native", "hf"])
def test_training_state_bytes_are_the_engines_tensors(deepspeed_run, tmp_path, family, stage):
    """Two ranks, ep_size 2: the module's parameters, the gradients after a backward (ZeRO 0) and the
    optimizer's fp32 partitions and AdamW moments (ZeRO 2, up to DeepSpeed's alignment padding)."""
    sets = ["model.vocab_size=50", "moe.ep_size=2", "data.path=/nonexistent"]
    if family == "native":
        sets += TINY_MODEL + ["moe.moe_every=1"]
        config = []
    else:
        sets += ["model.seq_len=32", "model.hf.hidden_size=32", "model.hf.intermediate_size=32",
                 "model.hf.num_local_experts=4", "model.hf.num_hidden_layers=2", "train.micro_batch=2"]
        config = ["--config", str(REPO / "configs" / "cpu_phimoe.yaml")]
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = config + ["--ds", str(tmp_path / "ds.json")] + [a for s in sets for a in ("--set", s)]
    out = deepspeed_run("plan_state.py", 2, *args)
    cfg = load_config(REPO / "configs" / "cpu_phimoe.yaml" if family == "hf" else None,
                      sets + [f"ds_config={tmp_path / 'ds.json'}"])
    want = make_plan(cfg, 2, 80 * GiB).state
    for rank in range(2):
        got = json.loads((out / f"rank{rank}.json").read_text())
        assert got["weights"] == want.weights
        if stage == 0:
            assert got["gradients"] == want.gradients and got["optimizer"] == want.optimizer
        else:
            assert got["optimizer"] == pytest.approx(want.optimizer, rel=0.01)
