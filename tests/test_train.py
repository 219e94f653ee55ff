"""Pre-training under the real deepspeed launcher (launch/local.sh): 2 CPU ranks, ep_size 2, gloo."""
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_resumed_as_uninterrupted, free_port, launch_env, rank_pids, run_metrics, set_args
from safetensors.torch import load_file

from sparsemixer_ds.config import ConfigError
from sparsemixer_ds.data.loader import eval_batches
from sparsemixer_ds.data.prepared import open_split
from sparsemixer_ds.export import load_export
from sparsemixer_ds.run.comm import SHM_DIR
from sparsemixer_ds.run.rundir import RunDir


def launch_cmd(run_dir, corpus, *overrides, port, ds_config="ds_configs/cpu.json", resume=False):
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(port),
           "--ds-config", str(REPO / ds_config), "--", "--set", f"run_dir={run_dir}", "--set",
           f"data.path={corpus}"]
    return cmd + set_args(*overrides) + (["--resume"] if resume else [])


def launch(run_dir, corpus, *overrides, ds_config="ds_configs/cpu.json", resume=False, timeout=300, check=True):
    port = free_port()
    cmd = launch_cmd(run_dir, corpus, *overrides, port=port, ds_config=ds_config, resume=resume)
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if not check:
        return proc
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    # DeepSpeed's CPU backend made a 66 MB shared-memory segment per rank; the run unlinked them.
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared memory left behind"
    return proc


@pytest.mark.parametrize("router, k, zero, extra", [
    ("sparsemixer", 1, 2, {"tensorboard": {"enabled": True}}),
    ("sparsemixer-v2", 2, 1, {"bf16": {"enabled": True}}),
    ("sparsemixer-v2", 1, 0, {}),
    ("switch", 1, 2, {"grad_accum": 2}),
    ("gshard", 2, 1, {}),
])
def test_two_rank_expert_parallel_training_for_each_router(tmp_path, corpus, router, k, zero, extra):
    ds_config = tmp_path / "ds.json"
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"]["stage"] = zero
    ds.update({key: value for key, value in extra.items() if key != "grad_accum"})
    ds_config.write_text(json.dumps(ds))
    accum = extra.get("grad_accum", 1)
    run_dir = tmp_path / "run"
    proc = launch(run_dir, corpus, f"moe.router={router}", f"moe.top_k={k}", "train.steps=12", "eval.interval=6",
                  "checkpoint.interval=4", "checkpoint.keep=2", f"train.grad_accum={accum}", ds_config=ds_config)
    assert "final validation loss" in proc.stdout and str(run_dir / "training.png") in proc.stdout
    metrics = run_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 13))
    assert [m["step"] for m in evals] == [6, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, "a byte LM learns the byte frequencies in a few steps"
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in train)
    assert train[-1]["tokens"] == 12 * 4 * accum * 2 * 32
    for layer in train[-1]["layers"]:  # two MoE layers, four experts each
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
        assert 0.0 <= layer["dropped"] <= 1.0 and 0.0 < layer["entropy"] <= math.log(4) + 1e-6
    assert len(train[-1]["layers"]) == 2
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000008", "step_00000012"], "checkpoints at 4, 8, 12; the newest two are kept"
    # DeepSpeed saves each expert of each MoE layer in a file of its own.
    assert len(list((run_dir / "checkpoints" / "step_00000012").glob("layer_*_expert_*_model_states.pt"))) == 8
    monitor = run_dir / "monitor"
    assert any(monitor.rglob("Train_loss.csv")) and any(monitor.rglob("MoE_layer1_entropy.csv"))
    if "tensorboard" in extra:
        assert any(monitor.rglob("events.out.tfevents.*"))
    assert (run_dir / "training.png").stat().st_size > 10000
    assert (run_dir / "config.yaml").is_file() and (run_dir / "ds_config.json").is_file()
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == zero


FINISHED = ["train.steps=8", "checkpoint.interval=4", "checkpoint.keep=3", "eval.interval=4",
            "moe.eval_capacity_factor=4.0", "logging.plot=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """8 steps, a checkpoint every 4, every loss logged; drop_tokens off so evaluation drops nothing."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    launch(run_dir, corpus, *FINISHED)
    return run_dir


def test_a_rank_killed_while_saving_resumes_to_the_uninterrupted_result(tmp_path, corpus, finished_run):
    """The run of finished_run; rank 1 gets SIGKILL while the job writes its last checkpoint (step 8)."""
    run_dir = tmp_path / "killed"
    job = subprocess.Popen(launch_cmd(run_dir, corpus, *FINISHED, port=free_port()), cwd=REPO, env=launch_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    saving = run_dir / "checkpoints" / "step_00000008"
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").exists():
            assert time.time() < deadline and job.poll() is None, job.stdout.read()[-4000:]
            time.sleep(0.05)
        pids = rank_pids(str(run_dir))
        assert set(pids) == {0, 1}, f"training ranks not found: {pids}"
        while not saving.is_dir():
            assert time.time() < deadline and job.poll() is None, job.stdout.read()[-4000:]
            time.sleep(0.0005)
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
        assert job.wait(timeout=90) != 0, "a job that lost a rank must fail"
        assert time.time() - killed_at < 90 and rank_pids(str(run_dir)) == {}, "no rank outlives the job"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert not (saving / "COMPLETE").exists(), "killed mid-save: the tag is there, unmarked"
    assert RunDir(run_dir).store.tags() == ["step_00000004"]
    logged = max(m["step"] for m in run_metrics(run_dir))
    proc = launch(run_dir, corpus, *FINISHED, resume=True)
    assert f"removing {saving}: an interrupted save" in proc.stderr
    assert_resumed_as_uninterrupted(run_dir, finished_run, 4)
    assert logged - 4 <= 4, "at most one checkpoint interval of steps is lost"
    assert (saving / "COMPLETE").is_file(), "step 8 was saved again, whole this time"


def test_a_fused_routing_run_resumes_to_the_uninterrupted_result(tmp_path, corpus):
    """moe.routing_impl=fused: the compiled rounds take their coins from the step's seed as the eager ones do,
    so a run resumed from its step-4 checkpoint logs what it logged uninterrupted."""
    full = tmp_path / "full"
    launch(full, corpus, *FINISHED, "moe.routing_impl=fused")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "LOCK").unlink(missing_ok=True)
    cmd = launch_cmd(resumed, corpus, *FINISHED, "moe.routing_impl=fused", port=free_port())
    proc = subprocess.run(cmd + ["--resume-tag", "step_00000004"], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_resumed_as_uninterrupted(resumed, full, 4)


def disk_usage(path: Path) -> int:
    """Bytes a tree takes on a tmpfs: every file rounded up to whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def test_a_full_disk_fails_the_save_and_keeps_the_last_checkpoint(tmp_path, corpus, finished_run):
    # run_dir on a tmpfs with room for all that finished_run wrote but half of its last checkpoint.
    last = finished_run / "checkpoints" / "step_00000008"
    disk = tmp_path / "disk"
    disk.mkdir()
    size = disk_usage(finished_run) - disk_usage(last) // 2
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        run_dir = disk / "run"
        proc = launch(run_dir, corpus, *FINISHED, check=False)
        assert proc.returncode != 0, "a run that cannot save must fail"
        failed = str(run_dir / "checkpoints" / "step_00000008")
        assert f"could not write checkpoint {failed}" in proc.stderr, proc.stderr[-3000:]
        assert "The checkpoints saved before are intact (step_00000004) and --resume continues" in proc.stderr
        assert RunDir(run_dir).store.tags() == ["step_00000004"]
        assert not (run_dir / "checkpoints" / "step_00000008" / "COMPLETE").exists()
        # The checkpoint that was kept is whole: on a disk with room, --resume finishes the run.
        moved = tmp_path / "moved"
        shutil.copytree(run_dir, moved)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    launch(moved, corpus, *FINISHED, resume=True)
    assert_resumed_as_uninterrupted(moved, finished_run, 4)


def test_resume_refuses_an_empty_run_and_a_fresh_start_refuses_a_used_one(tmp_path, corpus, finished_run):
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(free_port()), "--",
           "--set", f"run_dir={finished_run}", "--set", f"data.path={corpus}"] + set_args()
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "already holds a run; pass --resume" in proc.stderr
    cmd[cmd.index(f"run_dir={finished_run}")] = f"run_dir={tmp_path / 'new'}"
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no checkpoint to resume from" in proc.stderr
    assert not (tmp_path / "new").exists(), "a refused run creates nothing"


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_export_gathers_every_expert_and_reproduces_the_validation_loss(tmp_path, corpus, finished_run):
    out = tmp_path / "model.safetensors"
    cli("export", "--run", str(finished_run), "--out", str(out))
    weights = load_file(out)  # tensors only: no code, no DeepSpeed
    experts = [k for k in weights if ".deepspeed_experts." in k and k.endswith("0.weight")]
    assert len(experts) == 2 * 4, "both MoE layers with all four experts, though each rank held two"
    model, cfg, _ = load_export(out)
    assert cfg.moe.ep_size == 1
    # The two ranks' final validation batches through the exported model: the same loss the
    # distributed model logged (its eval capacity drops nothing, so routing is per token).
    total, count = 0.0, 0
    for rank in range(2):
        for x, y in eval_batches(open_split(corpus, "val"), 32, 4, rank, 2, 2):
            with torch.no_grad():
                logits = model(x).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    logged = [m for m in run_metrics(finished_run) if "val_loss" in m][-1]
    assert logged["step"] == 8
    assert total / count == pytest.approx(logged["val_loss"], rel=1e-5)


def test_generate_from_checkpoint_and_from_export_agree(tmp_path, finished_run):
    out = tmp_path / "model.safetensors"
    cli("export", "--run", str(finished_run), "--out", str(out))
    args = ["--prompt", "def ", "--tokens", "24", "--temperature", "0"]
    from_export = cli("generate", "--export", str(out), *args).splitlines()[-1]
    from_checkpoint = cli("generate", "--run", str(finished_run), *args).splitlines()[-1]
    assert from_export.startswith("def ") and len(from_export) > len("def ")
    assert from_export == from_checkpoint


class _RunsCode:
    """Unpickling this runs code: what a crafted checkpoint or export would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    crafted = tmp_path / "model.safetensors"
    torch.save({"state_dict": _RunsCode(tmp_path / "PWNED")}, crafted)
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_export(crafted)
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "generate", "--export", str(crafted)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a safetensors file" in proc.stderr
    assert not (tmp_path / "PWNED").exists(), "nothing was unpickled"


def test_memory_stays_flat_over_a_long_run(tmp_path, corpus):
    """300 steps of the tiny model: rank 0's resident memory must not grow with the steps. Once warm it moves by
    about 1 KB a step (0.9 MB from step 150 to 1000 in a 1000-step run), so 5 MB over the 150 steps between the two
    windows' medians catches a leak of 33 KB a step (the 1000-step version of this test: 20 MB over 650, 31 KB)."""
    run_dir = tmp_path / "long"
    launch(run_dir, corpus, "train.steps=300", "logging.interval=25", "eval.interval=300", "checkpoint.interval=0",
           "logging.plot=false", "model.seq_len=16", "train.micro_batch=2", timeout=600)
    rss = {m["step"]: m["rss_mb"] for m in run_metrics(run_dir) if "rss_mb" in m}
    early = statistics.median(rss[s] for s in (100, 125, 150))
    late = statistics.median(rss[s] for s in (250, 275, 300))
    assert late - early < 5, f"rank 0 grew from {early:.1f} MB to {late:.1f} MB in 150 steps"


def test_resume_on_another_layout_keeps_the_model(tmp_path, corpus, finished_run):
    """2 ranks with ep_size 2 -> 1 rank with ep_size 1: every expert lands on the one rank, the model computes
    the same validation loss at the resume point, and the reset optimizer state is announced."""
    run_dir = tmp_path / "relaid"
    shutil.copytree(finished_run, run_dir)
    # One rank reads 4 validation batches: the same 16 windows the two ranks read 2 batches each of.
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "1", "--master-port", str(free_port()), "--"]
    cmd += set_args(f"run_dir={run_dir}", f"data.path={corpus}", "moe.ep_size=1", "train.steps=10",
                    "checkpoint.interval=4", "checkpoint.keep=3", "eval.interval=4", "eval.batches=4",
                    "moe.eval_capacity_factor=4.0", "logging.plot=false") + ["--resume"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "WARNING: resuming step_00000008 on another layout: weights loaded, optimizer state reset" in proc.stderr
    metrics = run_metrics(run_dir)
    saved = [m for m in metrics if m.get("step") == 8 and "val_loss" in m and not m.get("resumed")][0]
    resumed = [m for m in metrics if m.get("resumed")][0]
    assert resumed["step"] == 8 and resumed["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    assert [m["step"] for m in metrics if "loss" in m][-2:] == [9, 10], "training went on from step 8"


def test_resume_from_one_rank_onto_two(tmp_path, corpus):
    """1 rank with ep_size 1 -> 2 ranks with ep_size 2: each rank takes its half of the experts."""
    run_dir = tmp_path / "grown"
    common = [f"run_dir={run_dir}", f"data.path={corpus}", "checkpoint.interval=4", "eval.interval=4",
              "moe.eval_capacity_factor=4.0", "logging.plot=false"]
    one = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "1", "--master-port", str(free_port()), "--"]
    proc = subprocess.run(one + set_args(*common, "moe.ep_size=1", "train.steps=4", "eval.batches=4"), cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    proc = launch(run_dir, corpus, "train.steps=6", "checkpoint.interval=4", "eval.interval=4",
                  "moe.eval_capacity_factor=4.0", "logging.plot=false", resume=True)
    assert "WARNING: resuming step_00000004 on another layout" in proc.stderr
    metrics = run_metrics(run_dir)
    saved = [m for m in metrics if m.get("step") == 4 and "val_loss" in m and not m.get("resumed")][0]
    resumed = [m for m in metrics if m.get("resumed")][0]
    assert resumed["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    assert [m["step"] for m in metrics if "loss" in m][-2:] == [5, 6]


# Written by `sparsemixer-ds export` with the code of commit d725c30, before the model-family seam and the
# model-owned loss: the tiny model (TINY with moe.moe_every=1), 40 steps on 2 ranks. The figures below are
# what that code computed from it.
OLD_EXPORT = REPO / "tests" / "fixtures" / "tiny-export-d725c30.safetensors"


def test_an_export_written_by_earlier_code_loads_and_computes_what_it_did():
    model, cfg, tokenizer = load_export(OLD_EXPORT)
    assert cfg.model.family == "native" and tokenizer == {"kind": "bytes", "json": None}
    ids = torch.tensor([list(b"def greet(name):\n    return name\n")])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
    assert float(out.ce) == pytest.approx(2.852731943130493, rel=1e-6)
    sampled = cli("generate", "--export", str(OLD_EXPORT), "--prompt", "import ", "--tokens", "40", "--temperature",
                  "0.8", "--seed", "3")
    assert sampled.endswith("import \n                             s_'ae(eeeT\n")


# A run directory written with the code of commit fc38952, before the package moved into folders and the router
# core: the tiny model (TINY with moe.moe_every=1, ep_size 2) trained 4 steps on 2 ranks on its own small corpus
# (corpus/, six stdlib files), its step-2 checkpoint kept and metrics.jsonl as the uninterrupted run logged it.
OLD_RUN = REPO / "tests" / "fixtures" / "run-fc38952"


def test_a_checkpoint_saved_by_earlier_code_resumes_as_the_run_went_on(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir, ignore=shutil.ignore_patterns("corpus"))
    data = OLD_RUN / "corpus"
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("path: /tmp/fx/data", f"path: {data}"))  # where it is here
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(free_port()),
           "--config", str(run_dir / "config.yaml"), "--", "--set", f"run_dir={run_dir}", "--set",
           "logging.plot=false", "--resume"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_resumed_as_uninterrupted(run_dir, OLD_RUN, 2)
    assert [m["step"] for m in run_metrics(run_dir) if "loss" in m][-2:] == [3, 4]


def check_resume(run_dir, corpus, *overrides):
    return subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "check", "--world-size", "2", "--resume",
                           "--config", str(REPO / "configs" / "cpu_small.yaml"), "--set", f"run_dir={run_dir}",
                           "--set", f"data.path={corpus}", "--set", f"ds_config={REPO / 'ds_configs' / 'cpu.json'}"]
                          + set_args(*FINISHED, *overrides), cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=120)


def test_resume_refuses_settings_that_fix_the_trajectory_and_writes_nothing(tmp_path, corpus, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = (run_dir / "config.yaml").read_bytes()
    proc = check_resume(run_dir, corpus, "train.lr=0.03", "train.seed=7", "moe.jitter_eps=0.2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--resume: {run_dir / 'config.yaml'} fixes these settings for the run, and they differ (" in proc.stderr
    for said in ("train.lr: 0.01 in the run, 0.03 now", "train.seed: 0 in the run, 7 now",
                 "moe.jitter_eps: 0.1 in the run, 0.2 now"):
        assert said in proc.stderr, proc.stderr
    assert "start a new run with another run_dir" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (run_dir / "config.yaml").read_bytes() == before, "config.yaml still says what the run uses"
    # What only watches or lays out the run may change.
    proc = check_resume(run_dir, corpus, "eval.interval=2", "logging.interval=3", "train.stop_grace_s=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume: eval.interval: 4 in the run, 2 now: applied" in proc.stderr
    proc = check_resume(run_dir, corpus, "train.steps=6")
    assert proc.returncode == 2 and "step_00000008 is at step 8, and the run would now end at step 6" in proc.stderr


def test_a_longer_run_on_resume_recomputes_the_schedule_as_it_says(tmp_path, corpus, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    proc = launch(run_dir, corpus, *FINISHED, "train.steps=12", resume=True)
    lr, warmup, floor = 0.01, 2, 0.1  # TINY's train.lr and train.warmup_steps, the default min_lr_ratio

    def schedule(step, total):  # linear warm-up, then cosine to lr * floor at the end of the run
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1, (step - warmup) / (total - warmup)))))

    assert (f"the run's length changes from 8 to 12 steps (train.steps: 8 in the run, 12 now): the learning-rate "
            f"schedule (warm-up, then cosine to the end) is recomputed over 12 steps, so from step 8 on the learning "
            f"rate is {schedule(8, 12):.4g} where it would have been {schedule(8, 8):.4g}") in proc.stderr
    logged = [m for m in run_metrics(run_dir) if "lr" in m and m["step"] > 8]
    assert [m["step"] for m in logged] == [9, 10, 11, 12]
    for m in logged:  # the rate after step s is the schedule's at s
        assert m["lr"] == pytest.approx(schedule(m["step"], 12), rel=1e-9)
    assert "steps: 12" in (run_dir / "config.yaml").read_text()
    starts = sorted((run_dir / "starts").glob("start_*.yaml"))
    assert [p.name for p in starts] == ["start_001.yaml", "start_002.yaml"]
    assert "steps: 8" in starts[0].read_text() and '"resumed_from": "step_00000008"' in starts[1].read_text()
