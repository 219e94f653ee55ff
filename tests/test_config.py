"""Run config: defaults <- YAML <- overrides, and every error naming the key, the file and the fix."""
import json
import re
from pathlib import Path

import pytest

from sparsemixer_ds.config import (ConfigError, DSSettings, RunConfig, config_dict, config_from_dict, load_config,
                                   load_ds_config, total_steps)
from sparsemixer_ds.routing.registry import ROUTERS

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_then_overrides_on_top_of_defaults(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 64\n  n_heads: 2\nmoe:\n  router: gshard\n  top_k: 2\n")
    cfg = load_config(path, ["train.steps=7", "train.betas=[0.8, 0.9]", "moe.drop_tokens=false", "run_dir=x/y"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (64, 2, RunConfig().model.n_layers)
    assert (cfg.moe.router, cfg.moe.top_k, cfg.moe.drop_tokens) == ("gshard", 2, False)
    assert cfg.train.steps == 7 and cfg.train.betas == [0.8, 0.9] and cfg.run_dir == "x/y"
    assert isinstance(cfg.train.lr, float)


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert (REPO / cfg.ds_config).is_file(), f"{path} names a missing DS config"
        load_ds_config(REPO / cfg.ds_config, cfg, world_size=cfg.moe.ep_size)


def test_resolved_config_round_trips():
    cfg = load_config(None, ["moe.router=sparsemixer-v2", "moe.top_k=2"])
    assert config_from_dict(config_dict(cfg), "saved") == cfg


@pytest.mark.parametrize("text, override, needles", [
    ("model:\n  d_modl: 64\n", None, ["unknown key 'model.d_modl'", "did you mean 'model.d_model'", "run.yaml"]),
    ("trainer:\n  steps: 3\n", None, ["unknown key 'trainer'", "run.yaml"]),
    ("model:\n  d_model: 64.5\n", None, ["'model.d_model' must be an integer", "64.5", "run.yaml"]),
    ("moe:\n  drop_tokens: 'no'\n", None, ["'moe.drop_tokens' must be true or false"]),
    ("model: 3\n", None, ["'model' must be a mapping"]),
    ("", "train.stpes=4", ["--set train.stpes=4", "did you mean 'train.steps'"]),
    ("", "train.steps", ["key.sub=value"]),
    ("", "train.lr=fast", ["'train.lr' must be a number", "--set train.lr=fast"]),
])
def test_bad_keys_and_types_name_the_key_and_the_source(tmp_path, text, override, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("override, needle", [
    ("moe.num_experts=6", "divisible by moe.ep_size"),  # with ep_size 4 below
    ("moe.top_k=2", "does not fit moe.router='sparsemixer'"),
    ("moe.capacity_factor=-1", "moe.capacity_factor must be in (0, 64]"),
    ("moe.jitter_eps=-0.1", "moe.jitter_eps"),
    ("moe.router=expert-choice", "moe.router must be one of"),
    ("model.n_heads=3", "divisible by model.n_heads=3"),
    ("moe.z_loss_coef=0.001", "needs a SparseMixer router"),  # with router switch below
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps must be >= 0"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s must be >= 1 second"),
])
def test_cross_field_errors(override, needle):
    base = ["moe.ep_size=4"] if "num_experts" in override else []
    base += ["moe.router=switch"] if "z_loss" in override else []
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, base + [override])
    assert needle in str(err.value)


def test_router_validation_reads_the_registry():
    for router in ROUTERS.values():
        for k in (1, 2):
            overrides = [f"moe.router={router.name}", f"moe.top_k={k}"]
            if k in router.top_k:
                assert load_config(None, overrides).moe.top_k == k
            else:
                with pytest.raises(ConfigError, match=re.escape(f"takes top_k in {list(router.top_k)}")):
                    load_config(None, overrides)


def test_z_loss_without_a_balance_loss_is_accepted():
    cfg = load_config(None, ["moe.balance_coef=0", "moe.z_loss_coef=0.001"])
    assert (cfg.moe.balance_coef, cfg.moe.z_loss_coef) == (0.0, 0.001)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")


def test_ds_config_gets_the_batch_from_the_run_config(tmp_path):
    cfg = load_config(None, ["train.micro_batch=4", "train.grad_accum=3", "train.grad_clip=0.5"])
    ds = load_ds_config(REPO / "ds_configs" / "cpu.json", cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("ds, needle", [
    ({"train_micro_batch_size_per_gpu": 16}, "'train_micro_batch_size_per_gpu' is 16 but the run config's train.micro_batch is 8"),
    ({"train_batch_size": 999}, "'train_batch_size' is 999"),
    ({"gradient_accumulation_steps": 2}, "train.grad_accum"),
    ({"optimizer": {"type": "Adam"}}, "has an 'optimizer' block"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both fp16 and bf16"),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}}, "'bf16.check_grad_overflow' is false"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "'zero_optimization.compute_grad_norm' is false"),
])
def test_ds_config_conflicts_are_errors(tmp_path, ds, needle):
    path = write(tmp_path, json.dumps(ds), "ds.json")
    with pytest.raises(ConfigError) as err:
        load_ds_config(path, load_config(None), world_size=2)
    assert needle in str(err.value) and "ds.json" in str(err.value)


def test_ds_config_that_agrees_is_accepted(tmp_path):
    path = write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}), "ds.json")
    assert load_ds_config(path, load_config(None), world_size=2)["train_batch_size"] == 16


def test_token_budget_sets_the_steps():
    cfg = load_config(None, ["train.tokens=100000", "train.micro_batch=4", "model.seq_len=64"])
    assert total_steps(cfg, world_size=2) == -(-100000 // (4 * 1 * 2 * 64))
    assert total_steps(load_config(None, ["train.steps=5"]), world_size=8) == 5


@pytest.mark.parametrize("ds, want", [
    ({}, ("fp32", 0, (), False)),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     ("bf16", 3, ("weights",), True)),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": False},
      "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}, "offload_param": {"device": "none"}}},
     ("fp16", 2, ("optimizer",), True)),
])
def test_the_deepspeed_json_is_read_into_one_typed_view(ds, want):
    settings = DSSettings.of(ds)
    assert (settings.precision, settings.zero_stage, settings.offloaded, settings.mixed) == want
