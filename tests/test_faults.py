"""Non-finite steps, injected on one rank of a real 2-rank run (tests/dist/poisoned_train.py): the
step is skipped on every rank and counted; a run that keeps producing them stops with a checkpoint
of the last good state."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, launch_env, run_metrics, set_args


def poisoned_run(tmp_path, corpus, poison_steps, mode, zero, bf16, *overrides, resume=False):
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"]["stage"] = zero
    ds["bf16"] = {"enabled": bf16}
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    env = dict(launch_env(), POISON_STEPS=",".join(map(str, poison_steps)), POISON_RANK="1", POISON_MODE=mode)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / "poisoned_train.py"), "train", "--config", str(REPO / "configs" /
           "cpu_small.yaml"), "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.path={corpus}", "--set",
           f"ds_config={ds_path}"] + set_args("logging.plot=false", "checkpoint.keep=100", *overrides)
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def tag_tensors(tag_dir: Path) -> dict:
    """Every tensor in every file of a checkpoint tag (weights, master copies, Adam moments and
    step counts), by file and key path. The files are this test's own."""
    found = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            found[path] = obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}/{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}/{i}")

    for file in sorted(tag_dir.glob("*.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode, zero, bf16", [
    ("loss", 0, False),  # ZeRO 0 in fp32: the engine steps the client optimizer, GuardedAdamW checks
    ("grad", 2, False),  # ZeRO 2: DeepSpeed's optimizer sees the non-finite gradient norm
    ("grad", 0, True),  # bf16 without ZeRO: DeepSpeed's BF16_Optimizer checks its fp32 gradients
])
def test_non_finite_steps_are_skipped_on_every_rank_and_counted(tmp_path, corpus, mode, zero, bf16):
    proc = poisoned_run(tmp_path, corpus, [2, 3], mode, zero, bf16, "train.steps=7", "checkpoint.interval=1",
                        "eval.interval=7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    train = [m for m in run_metrics(run_dir) if "loss" in m]
    assert [m["skipped_steps"] for m in train] == [0, 0, 1, 2, 2, 2, 2]
    losses = [m["loss"] for m in train]
    if mode == "loss":
        assert losses[2] is None and losses[3] is None, "a NaN loss is logged as null"
    assert all(isinstance(v, float) for i, v in enumerate(losses) if mode == "grad" or i not in (2, 3))
    lrs = [m["lr"] for m in train]
    assert lrs[2] == lrs[3] == lrs[1] != lrs[4], "the LR schedule waits on a skipped step"
    tags = {step: tag_tensors(run_dir / "checkpoints" / f"step_{step:08d}") for step in (2, 3, 4, 5)}
    assert same_state(tags[2], tags[3]) and same_state(tags[2], tags[4]), \
        "skipped steps change no weight, master copy or optimizer moment"
    assert not same_state(tags[4], tags[5]), "the next good step trains again"
    final = [m for m in run_metrics(run_dir) if "val_loss" in m][-1]
    assert final["step"] == 7 and final["val_loss"] < 6.0


def test_a_run_that_keeps_failing_stops_with_the_last_good_state(tmp_path, corpus):
    args = ["train.steps=12", "checkpoint.interval=2", "train.max_skipped_steps=3", "eval.interval=100"]
    proc = poisoned_run(tmp_path, corpus, range(2, 12), "loss", 1, True, *args)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps 3-5 all had a non-finite loss or gradients and were skipped (train.max_skipped_steps=3)" \
        in proc.stderr
    run_dir = tmp_path / "run"
    assert "the last good state is saved as " + str(run_dir / "checkpoints" / "step_00000005") in proc.stderr
    assert run_metrics(run_dir)[-1] == {"step": 5, "skipped_steps": 3, "stopped": "non-finite"}
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*") if (p / "COMPLETE").is_file()) == \
        ["step_00000002", "step_00000004", "step_00000005"]
    assert same_state(tag_tensors(ckpts / "step_00000002"), tag_tensors(ckpts / "step_00000005"))
    # With the fault gone, --resume continues after the skipped steps.
    proc = poisoned_run(tmp_path, corpus, [], "loss", 1, True, *args, resume=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = run_metrics(run_dir)
    assert [m for m in after if m.get("resumed")][0]["step"] == 5
    train = [m for m in after if "loss" in m and m["step"] > 5]
    assert [m["step"] for m in train] == list(range(6, 13)) and train[-1]["skipped_steps"] == 3
    assert all(isinstance(m["loss"], float) for m in train)
