"""model.family hf: Hugging Face MoE models (PhiMoE, Mixtral, Qwen3-MoE) trained by the trainer under
DeepSpeed's AutoEP with SparseMixer routers, through the real launcher (launch/local.sh, 2 CPU ranks)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_resumed_as_uninterrupted, free_port, launch_env, run_metrics, set_args

from sparsemixer_ds.config import ConfigError, load_config
from sparsemixer_ds.models.families import get_family
from sparsemixer_ds.train import preflight

# Tiny models of each family: 2 layers of width 32, 4 experts, top-2.
COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_experts_per_tok": 2}
HF = {
    "phimoe": {"model_type": "phimoe", "intermediate_size": 32, "num_local_experts": 4, **COMMON},
    "mixtral": {"model_type": "mixtral", "intermediate_size": 32, "num_local_experts": 4, **COMMON},
    "qwen3_moe": {"model_type": "qwen3_moe", "moe_intermediate_size": 32, "intermediate_size": 64, "num_experts": 4,
                  "head_dim": 8, **COMMON},
}


def write_config(tmp_path, corpus, model_type, ds_config=REPO / "ds_configs" / "cpu.json", **sections):
    values = {"run_dir": str(tmp_path / "run"), "ds_config": str(ds_config),
              "model": {"family": "hf", "seq_len": 32, "hf": dict(HF[model_type])},
              "moe": {"router": "sparsemixer-v2", "ep_size": 2, "balance": "global"},
              "data": {"path": str(corpus)},
              "train": {"micro_batch": 4, "steps": 8, "lr": 0.003, "warmup_steps": 2},
              "eval": {"interval": 4, "batches": 2, "batch_size": 4},
              "checkpoint": {"interval": 4, "keep": 3},
              "logging": {"interval": 1, "progress": False}}
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    path = tmp_path / f"{model_type}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(config, *extra, timeout=400):
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--config", str(config), "--nproc", "2", "--master-port",
           str(free_port()), "--", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def phimoe_run(tmp_path_factory, corpus):
    """8 steps of a tiny PhiMoE under ZeRO-3, AutoEP ep_size 2, global balance; checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("phimoe")
    config = write_config(tmp, corpus, "phimoe", ds_config=REPO / "ds_configs" / "cpu_zero3.json")
    proc = launch(config)
    return config, tmp / "run", proc


def test_phimoe_trains_under_zero3_with_per_layer_expert_load(phimoe_run):
    _, run_dir, proc = phimoe_run
    assert "final validation loss" in proc.stdout
    records = run_metrics(run_dir)
    train = [m for m in records if "loss" in m]
    evals = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 9)) and [m["step"] for m in evals] == [4, 8]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, "a byte LM learns the byte frequencies in a few steps"
    for m in train:  # two MoE layers, four experts, two routes per token
        assert len(m["layers"]) == 2
        for layer in m["layers"]:
            assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
            assert layer["dropped"] == 0.0, "AutoEP is dropless"
            assert 0.0 < layer["entropy"] <= math.log(4) + 1e-6
        # The logged balance loss is the two layers' Switch losses summed: 1 each at perfect balance, at most E.
        assert 2.0 * 0.99 < m["balance_loss"] < 2 * 4
    saved = json.loads((run_dir / "ds_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == 3
    assert saved["expert_parallel"]["autoep_size"] == 2 and saved["expert_parallel"]["router_pattern"] == "router"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    assert (run_dir / "training.png").stat().st_size > 10000


def test_phimoe_resume_repeats_the_uninterrupted_run(tmp_path, phimoe_run):
    config, run_dir, _ = phimoe_run
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    (resumed / "LOCK").unlink(missing_ok=True)
    launch(config, "--set", f"run_dir={resumed}", "--resume-tag", "step_00000004")
    assert_resumed_as_uninterrupted(resumed, run_dir, from_step=4)


def test_a_zero3_checkpoint_resumes_only_onto_its_own_layout(phimoe_run):
    """DeepSpeed's AutoEP loads a ZeRO-3 checkpoint only onto the ranks and ep_size that saved it: refused
    before any rank starts, saying what would work."""
    config, run_dir, _ = phimoe_run
    for overrides, world in ((["moe.ep_size=1"], 2), ([], 4), (["ds_config=" + str(REPO / "ds_configs" / "cpu.json")], 2)):
        with pytest.raises(ConfigError) as err:
            preflight(load_config(config, overrides), world=world, resume=True)
        assert "was saved under ZeRO-3 by 2 ranks with moe.ep_size=2" in str(err.value)
        assert "resume with 2 ranks, moe.ep_size=2 and ZeRO-3" in str(err.value)


def test_a_non_finite_step_is_skipped_on_every_rank_under_autoep_and_zero3(tmp_path, corpus):
    """tests/dist/poisoned_train.py: the gradient from the logits turns NaN on rank 1 at steps 2 and 3."""
    config = write_config(tmp_path, corpus, "phimoe", ds_config=REPO / "ds_configs" / "cpu_zero3.json")
    env = dict(launch_env(), POISON_STEPS="2,3", POISON_RANK="1", POISON_MODE="grad")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / "poisoned_train.py"), "train", "--config", str(config)] + set_args(
               "train.steps=6", "eval.interval=6", "checkpoint.interval=6", "logging.plot=false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = [m for m in run_metrics(tmp_path / "run") if "loss" in m]
    assert [m["skipped_steps"] for m in train] == [0, 0, 1, 2, 2, 2]
    lrs = [m["lr"] for m in train]
    assert lrs[2] == lrs[3] == lrs[1] != lrs[4], "the LR schedule waits on a skipped step"
    assert all(math.isfinite(m["loss"]) for m in train)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_mixtral_and_qwen3_moe_train_with_sparsemixer(tmp_path, corpus, model_type):
    """Mixtral's run is then resumed onto ep_size 1 for a fifth step."""
    config = write_config(tmp_path, corpus, model_type, train={"steps": 4}, eval={"interval": 4},
                          checkpoint={"interval": 4}, logging={"interval": 1, "progress": False, "plot": False})
    launch(config)
    train = [m for m in run_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(len(layer["load"]) == 4 for layer in train[-1]["layers"]) and len(train[-1]["layers"]) == 2
    if model_type == "mixtral":  # ZeRO-2 checkpoints (each expert in a file) resume onto another ep_size
        proc = launch(config, "--set", "moe.ep_size=1", "--set", "train.steps=5", "--resume")
        assert "moe.ep_size: 2 in the run, 1 now: applied" in proc.stderr
        records = run_metrics(tmp_path / "run")
        saved = [m for m in records if m["step"] == 4 and "val_loss" in m and not m.get("resumed")][0]
        mark = [m for m in records if m.get("resumed")][0]
        assert mark["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-6), "every expert as saved"
        assert [m["step"] for m in records if "loss" in m][-1] == 5


def refused(tmp_path, corpus, model_type="phimoe", ds=None, world=2, **sections):
    ds_path = REPO / "ds_configs" / "cpu.json"
    if ds is not None:
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds))
    config = write_config(tmp_path, corpus, model_type, ds_config=ds_path, **sections)
    with pytest.raises(ConfigError) as err:
        preflight(load_config(config), world=world, resume=False)
    assert not (tmp_path / "run").exists(), "nothing written"
    return str(err.value)


def test_a_bad_hf_setup_is_refused_before_any_work(tmp_path, corpus):
    phimoe = HF["phimoe"]
    message = refused(tmp_path, corpus, model={"hf": {**phimoe, "model_type": "llama"}})
    assert "model_type must be one of phimoe, mixtral, qwen3_moe" in message and "got 'llama'" in message
    assert "vocab_size=1000 but the data's vocabulary is 257" in refused(
        tmp_path, corpus, model={"hf": {**phimoe, "vocab_size": 1000}})
    assert "max_position_embeddings=16 is below model.seq_len=32" in refused(
        tmp_path, corpus, model={"hf": {**phimoe, "max_position_embeddings": 16}})
    assert "moe.router='gshard' is one of DeepSpeed's TopKGate baselines" in refused(
        tmp_path, corpus, moe={"router": "gshard", "top_k": 2})
    assert "num_experts_per_tok=2 does not fit moe.router='sparsemixer'" in refused(
        tmp_path, corpus, moe={"router": "sparsemixer"})
    assert "4 experts per layer are not divisible by moe.ep_size=3" in refused(tmp_path, corpus, world=3, moe={"ep_size": 3})
    assert "exactly one of model.hf" in refused(tmp_path, corpus, model={"hf": phimoe, "hf_config": "x.json"})
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    assert "expert_parallel.autoep_size=1, but moe.ep_size needs 2" in refused(
        tmp_path, corpus, ds={**ds, "expert_parallel": {"autoep_size": 1}})
    assert "score_apply=\"pre\"" in refused(tmp_path, corpus, ds={**ds, "expert_parallel": {"score_apply": "pre"}})
    assert "route_norm=true" in refused(tmp_path, corpus, model_type="mixtral",
                                        ds={**ds, "expert_parallel": {"route_norm": True}})


def test_an_unsupported_transformers_release_is_named(tmp_path, corpus, monkeypatch):
    import transformers
    for version in ("5.23.0", "4.57.6", "5.4.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        message = refused(tmp_path, corpus)
        assert f"transformers {version} does not work with DeepSpeed" in message
        assert "pip install 'transformers>=5.0.0,<5.23.0,!=5.4.0'" in message


def test_the_hf_config_can_come_from_a_config_json_and_set_overrides_merge(tmp_path, corpus):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(HF["mixtral"]))
    config = write_config(tmp_path, corpus, "mixtral")
    values = yaml.safe_load(config.read_text())
    values["model"] = {"family": "hf", "seq_len": 32, "hf_config": str(tmp_path / "ckpt")}
    config.write_text(yaml.safe_dump(values))
    cfg = load_config(config)
    preflight(cfg, world=2, resume=False)
    assert get_family(cfg).experts_per_layer(cfg) == 4
    inline = load_config(write_config(tmp_path, corpus, "phimoe"), ["model.hf.num_local_experts=8"])
    assert inline.model.hf["num_local_experts"] == 8 and inline.model.hf["hidden_size"] == 32
