"""Pre-flight checks: bad input is refused before any rank starts, naming the problem, creating nothing."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO, TINY

from sparsemixer_ds.config import ConfigError, dump_yaml, load_config
from sparsemixer_ds.run.checkpoints import COMPLETE
from sparsemixer_ds.run.rundir import RunDir
from sparsemixer_ds.train import preflight


def config(tmp_path, corpus, *overrides):
    return load_config(None, TINY + [f"run_dir={tmp_path / 'run'}", f"data.path={corpus}",
                                     f"ds_config={REPO / 'ds_configs' / 'cpu.json'}", *overrides])


def test_a_good_run_passes_and_creates_nothing(tmp_path, corpus):
    plan = preflight(config(tmp_path, corpus), world=2, resume=False)
    assert plan.resume_tag is None and plan.ds_config["train_batch_size"] == 4 * 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, world, needle", [
    ([], 3, "world size 3 is not divisible by moe.ep_size=2"),
    (["model.vocab_size=100"], 2, "model.vocab_size=100 is smaller than the data's vocabulary (257"),
    (["model.seq_len=100000"], 2, "seq_len"),
    (["data.path=/nonexistent/data"], 2, "has no meta.json; prepare it first"),
    (["ds_config=/nonexistent/ds.json"], 2, "DeepSpeed config /nonexistent/ds.json does not exist"),
    (["model.family=mamba"], 2, "model.family must be one of native, hf; got 'mamba'"),
    (["model.family=hf"], 2, "model.family hf needs the Hugging Face config in exactly one of model.hf"),
])
def test_bad_runs_are_refused_with_the_reason(tmp_path, corpus, overrides, world, needle):
    with pytest.raises((ConfigError, ValueError)) as err:
        preflight(config(tmp_path, corpus, *overrides), world=world, resume=False)
    assert needle in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_native_family_refuses_zero_3(tmp_path, corpus):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as err:
        preflight(config(tmp_path, corpus, f"ds_config={ds}"), world=2, resume=False)
    assert f"{ds}: zero_optimization.stage=3; DeepSpeed's MoE layers work with ZeRO stages 0, 1 and 2 only" \
        in str(err.value)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, corpus):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    tokens[5] = 300  # meta.json says 257 ids
    tokens.tofile(data / "val.bin")
    with pytest.raises(ConfigError, match="holds token id 300, outside the vocabulary of 257"):
        preflight(config(tmp_path, corpus, f"data.path={data}"), world=2, resume=False)


def fake_run(run_dir, cfg, complete=True):
    tag = RunDir(run_dir).checkpoints / "step_00000004"
    tag.mkdir(parents=True)
    if complete:
        (tag / COMPLETE).write_text("{}")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 5.0}) + "\n")


def test_resume_refuses_checkpoints_of_another_model_shape(tmp_path, corpus):
    fake_run(tmp_path / "run", config(tmp_path, corpus, "model.d_model=64", "model.vocab_size=257"))
    with pytest.raises(ConfigError) as err:
        preflight(config(tmp_path, corpus), world=2, resume=True)
    assert "of another model shape (model.d_model: 64 in the run, 32 now)" in str(err.value)
    assert not (tmp_path / "run" / "ds_config.json").exists(), "a refused resume writes nothing"
    # The same shape with another layout (ep_size) or schedule is fine.
    same_shape = config(tmp_path, corpus, "model.d_model=64", "moe.ep_size=1", "train.steps=99")
    assert preflight(same_shape, world=2, resume=True).resume_tag == "step_00000004"


def test_fresh_start_refuses_a_used_run_dir_and_resume_skips_partial_checkpoints(tmp_path, corpus):
    fake_run(tmp_path / "run", config(tmp_path, corpus, "model.vocab_size=257"), complete=False)
    assert RunDir(tmp_path / "run").store.tags() == [], "no COMPLETE marker, no checkpoint"
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        preflight(config(tmp_path, corpus), world=2, resume=False)
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        preflight(config(tmp_path, corpus), world=2, resume=True)


def test_run_dir_under_a_file_is_refused(tmp_path, corpus):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        preflight(config(tmp_path, corpus, f"run_dir={tmp_path / 'afile' / 'run'}"), world=2, resume=False)


def test_run_dir_on_a_read_only_disk_is_refused(tmp_path, corpus):
    # Root writes through file permissions, so the test makes the disk itself read-only.
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(ConfigError, match=f"run_dir {disk / 'run'}: {disk} is not writable; choose a run_dir"):
            preflight(config(tmp_path, corpus, f"run_dir={disk / 'run'}"), world=2, resume=False)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
