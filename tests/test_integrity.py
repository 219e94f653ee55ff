"""Damaged checkpoints and exports, on real files: a real 2-rank run saves several checkpoints, copies of
it are damaged the ways disks and copies damage files, and every command that reads them notices."""
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, launch_env, set_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import assert_resumed_as_uninterrupted, cli, launch

from sparsemixer_ds import cli as sparsemixer_cli
from sparsemixer_ds.config import ConfigError
from sparsemixer_ds.export import load_export
from sparsemixer_ds.run.checkpoints import COMPLETE
from sparsemixer_ds.run.rundir import RunDir

# Twelve steps, a checkpoint every two (all kept) and an evaluation at each, so any tag can be resumed
# and compared with what the uninterrupted run logged there.
RUN = ["train.steps=12", "checkpoint.interval=2", "checkpoint.keep=100", "eval.interval=2",
       "moe.eval_capacity_factor=4.0", "logging.plot=false"]
NEWEST = "step_00000012"


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    launch(run_dir, corpus, *RUN)
    return run_dir


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def flip(path: Path, count: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle - count // 2, middle + count // 2):
        data[i] ^= 0xFF
    path.write_bytes(data)


def delete(path: Path) -> None:
    path.unlink()


# kind -> (a file of a tag, the damage, what verification says about it)
DAMAGE = {
    "truncated expert": ("layer_0_expert_1_mp_rank_00_model_states.pt", truncate, "bytes, its marker recorded"),
    "zeroed expert": ("layer_1_expert_2_mp_rank_00_model_states.pt", zero, "has sha256"),
    "flipped expert": ("layer_1_expert_3_mp_rank_00_model_states.pt", flip, "has sha256"),
    "truncated model states": ("mp_rank_00_model_states.pt", truncate, "bytes, its marker recorded"),
    "deleted optimizer shard": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", delete, "is missing"),
}


def damaged_copy(intact_run, tmp_path, damage: dict) -> Path:
    """A copy of the run with ``damage`` = {tag: kind} done; returns the copy."""
    run_dir = tmp_path / "run"
    shutil.copytree(intact_run, run_dir)
    for tag, kind in damage.items():
        name, how, _ = DAMAGE[kind]
        how(run_dir / "checkpoints" / tag / name)
    return run_dir


def run_args(run_dir, corpus) -> list:
    return ["--config", str(REPO / "configs" / "cpu_small.yaml")] + set_args(
        f"ds_config={REPO / 'ds_configs' / 'cpu.json'}", f"run_dir={run_dir}", f"data.path={corpus}", *RUN)


def check(capsys, run_dir, corpus, *extra):
    """``sparsemixer-ds check --world-size 2 ...`` in this process: (exit code, stdout, stderr)."""
    code = sparsemixer_cli.main(["check", "--world-size", "2", *run_args(run_dir, corpus), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_file_of_a_checkpoint_is_recorded_with_its_size_and_sha256(intact_run):
    run = RunDir(intact_run)
    assert run.store.tags() == [f"step_{step:08d}" for step in range(2, 13, 2)]
    tag = run.checkpoints / NEWEST
    record = json.loads((tag / COMPLETE).read_text())
    assert (record["step"], record["tokens"]) == (12, 12 * 4 * 2 * 32)
    files = sorted(p.name for p in tag.iterdir() if p.name != COMPLETE)
    assert sorted(record["files"]) == files and len(files) == 11, "8 experts, model states, 2 ZeRO shards"
    for name in files:
        data = (tag / name).read_bytes()
        assert record["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert [state.state for state in run.store.states()] == ["intact"] * 6


@pytest.mark.parametrize("kind", DAMAGE)
def test_check_names_the_damaged_file_and_resume_tag_refuses_it(capsys, tmp_path, corpus, intact_run, kind):
    run_dir = damaged_copy(intact_run, tmp_path, {NEWEST: kind})
    name, _, says = DAMAGE[kind]
    bad = run_dir / "checkpoints" / NEWEST / name
    code, out, err = check(capsys, run_dir, corpus, "--resume")
    assert code == 0, err
    assert "  step_00000010  intact  <- resume\n" in out
    listed = [line for line in out.splitlines() if line.startswith(f"  {NEWEST}  ")]
    assert len(listed) == 1 and listed[0].startswith(f"  {NEWEST}  corrupt: {bad} ") and says in listed[0]
    warned = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1 and warned[0].startswith(f"WARNING: skipping checkpoint {NEWEST}, corrupt: {bad} ")
    assert warned[0].endswith("taking step_00000010, the newest intact one")
    code, out, err = check(capsys, run_dir, corpus, "--resume-tag", NEWEST)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sparsemixer-ds check: error: --resume-tag {NEWEST}: the checkpoint is corrupt: {bad} ")


def test_an_old_marker_is_resumed_unverified_and_no_intact_checkpoint_is_one_line(capsys, tmp_path, corpus,
                                                                                  intact_run):
    run_dir = damaged_copy(intact_run, tmp_path, {})
    (run_dir / "checkpoints" / NEWEST / COMPLETE).write_text(json.dumps({"step": 12, "tokens": 3072}))
    code, out, err = check(capsys, run_dir, corpus, "--resume")
    assert code == 0
    assert f"  {NEWEST}  unverified: its marker was written before markers held checksums  <- resume" in out
    assert f"note: {NEWEST} is taken unverified: its marker was written before markers held checksums\n" in err
    assert "WARNING" not in err
    shutil.copy(intact_run / "checkpoints" / NEWEST / COMPLETE, run_dir / "checkpoints" / NEWEST / COMPLETE)
    for tag in RunDir(run_dir).store.tags():
        delete(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "step_00000014").mkdir()  # an interrupted save
    code, out, err = check(capsys, run_dir, corpus, "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sparsemixer-ds check: error: {run_dir / 'checkpoints'} holds no intact checkpoint "
                          "(step_00000014 incomplete: no COMPLETE marker (a save that never finished); "
                          f"step_00000012 corrupt: {run_dir / 'checkpoints' / NEWEST / 'mp_rank_00_model_states.pt'}"
                          " is missing; step_00000010 corrupt:")


def test_resume_passes_over_each_kind_of_damage_and_repeats_the_uninterrupted_run(tmp_path, corpus, intact_run):
    """Each of the five newest checkpoints damaged another way: one real 2-rank --resume takes step 2, says
    why it skipped each, sets them aside and logs what the uninterrupted run did."""
    damage = dict(zip(["step_00000012", "step_00000010", "step_00000008", "step_00000006", "step_00000004"],
                      DAMAGE))
    run_dir = damaged_copy(intact_run, tmp_path, damage)
    proc = launch(run_dir, corpus, *RUN, resume=True)
    assert "Traceback" not in proc.stderr
    for tag, kind in damage.items():
        name, _, says = DAMAGE[kind]
        line = f"WARNING: skipping checkpoint {tag}, corrupt: {run_dir / 'checkpoints' / tag / name} "
        warned = [text for text in proc.stderr.splitlines() if text.startswith(line)]
        assert len(warned) == 2 and says in warned[0], "said once by check, once by rank 0"
        assert f"moving {run_dir / 'checkpoints' / tag} aside to {run_dir / 'checkpoints' / tag}.set-aside" \
            in proc.stderr
        assert (run_dir / "checkpoints" / f"{tag}.set-aside" / name).exists() == (kind != "deleted optimizer shard")
    assert_resumed_as_uninterrupted(run_dir, intact_run, 2)
    run = RunDir(run_dir)
    assert [state.describe() for state in run.store.states()] == ["intact"] * 6, "saved anew, whole"


def test_resume_tag_of_a_damaged_checkpoint_stops_every_rank_with_one_line(tmp_path, corpus, intact_run):
    """The ranks themselves (the deepspeed launcher, no launch script's check first) verify and refuse."""
    run_dir = damaged_copy(intact_run, tmp_path, {NEWEST: "flipped expert"})
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", "--module", "sparsemixer_ds.cli", "train", *run_args(run_dir, corpus),
           "--resume-tag", NEWEST]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    bad = run_dir / "checkpoints" / NEWEST / DAMAGE["flipped expert"][0]
    said = f"sparsemixer-ds train: error: --resume-tag {NEWEST}: the checkpoint is corrupt: {bad} has sha256 "
    assert output.count(said) == 2 and output.count("error:") == 2, "one line from each rank"
    assert not list((run_dir / "checkpoints").glob("*.set-aside")), "a refused resume changes nothing"


@pytest.fixture(scope="module")
def export_file(tmp_path_factory, intact_run):
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    cli("export", "--run", str(intact_run), "--out", str(out))
    return out


def rewritten(export_file, tmp_path, tensors=None, drop=()) -> Path:
    """The export with other tensors or without some metadata keys."""
    with safe_open(str(export_file), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k not in drop}
    out = tmp_path / "rewritten.safetensors"
    save_file(load_file(export_file) if tensors is None else tensors, str(out), metadata=metadata)
    return out


def test_an_export_records_every_tensors_sha256(export_file):
    with safe_open(str(export_file), framework="pt") as f:
        digests = json.loads(f.metadata()["sha256"])
        for name in f.keys():
            data = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert digests.pop(name) == hashlib.sha256(data).hexdigest()
    assert digests == {}


def test_generate_refuses_an_export_with_altered_tensor_data(tmp_path, export_file):
    data = bytearray(export_file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the tensor data follows the length-prefixed JSON header
    middle = (start + len(data)) // 2
    for i in range(middle - 2000, middle + 2000):
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "generate", "--export", str(damaged), "--prompt",
                           "def "], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    error = proc.stderr.splitlines()[-1]
    assert error.startswith(f"sparsemixer-ds generate: error: {damaged} is damaged: tensors blocks.")
    assert "changed since export (their sha256 differs from the one recorded); copy the file again" in error


@pytest.mark.parametrize("key", ["config", "tokenizer"])
def test_an_export_without_its_metadata_is_refused_naming_the_key(tmp_path, export_file, key):
    damaged = rewritten(export_file, tmp_path, drop=(key, ))
    with pytest.raises(ConfigError) as err:
        load_export(damaged)
    assert str(err.value) == (f"{damaged}: its metadata has no {key!r}, which every export holds; export the "
                              "checkpoint again with sparsemixer-ds export")


def test_an_export_whose_tensors_disagree_with_its_config_is_refused_naming_them(tmp_path, export_file):
    tensors = load_file(export_file)
    del tensors["embed.weight"]
    tensors["head.extra"] = torch.zeros(3)
    damaged = rewritten(export_file, tmp_path, tensors, drop=("sha256", ))
    with pytest.raises(ConfigError) as err:
        load_export(damaged)
    assert str(err.value) == (f"{damaged}: its tensors do not fit the model its config describes (missing "
                              "embed.weight; unexpected head.extra); export the checkpoint again with sparsemixer-ds "
                              "export")
    tensors = load_file(export_file)
    tensors["embed.weight"] = tensors["embed.weight"][:, :16].contiguous()
    damaged = rewritten(export_file, tmp_path, tensors, drop=("sha256", ))
    with pytest.raises(ConfigError, match=r"\(embed.weight is \(257, 16\), the config makes \(257, 32\)\)"):
        load_export(damaged)
    # With its digests kept, a missing tensor is damage to the file.
    del tensors["embed.weight"]
    damaged = rewritten(export_file, tmp_path, tensors)
    with pytest.raises(ConfigError, match="is damaged: tensors embed.weight recorded at export but missing"):
        load_export(damaged)


def test_export_takes_the_newest_intact_checkpoint_and_generate_refuses_a_damaged_tag(tmp_path, intact_run):
    run_dir = damaged_copy(intact_run, tmp_path, {NEWEST: "zeroed expert"})
    bad = run_dir / "checkpoints" / NEWEST / DAMAGE["zeroed expert"][0]
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "export", "--run", str(run_dir), "--out",
                           str(out)], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"WARNING: skipping checkpoint {NEWEST}, corrupt: {bad} has sha256 " in proc.stderr
    assert "taking step_00000010, the newest intact one" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", "generate", "--run", str(run_dir), "--tag",
                           NEWEST], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"sparsemixer-ds generate: error: --tag {NEWEST}: the checkpoint "
                                                   f"is corrupt: {bad} has sha256 ")
