"""Bad input ends in one line, ``sparsemixer-ds <command>: error: ...`` (exit code 2), naming the file, key
or value and the fix: no traceback, no silent acceptance, and nothing created (no run directory, no
files, no shared-memory segment). Command behaviour runs the real command; the rest calls the unit."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, free_port, launch_env, set_args

from sparsemixer_ds.config import ConfigError, load_config, load_ds_config
from sparsemixer_ds.data.corpus import iter_documents
from sparsemixer_ds.data.prepare import prepare
from sparsemixer_ds.data.prepared import read_meta
from sparsemixer_ds.models.families import get_family, training_state
from sparsemixer_ds.run.comm import SHM_DIR
from sparsemixer_ds.testing import TINY as TINY_MODEL
from sparsemixer_ds.train import preflight

CPU_JSON = REPO / "ds_configs" / "cpu.json"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsemixer_ds.cli", *args], cwd=cwd, env=launch_env(),
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """The one error line of a refused command, checked: exit code 2, no traceback, every needle in it."""
    errors = [line for line in proc.stderr.splitlines() if f"sparsemixer-ds {command}: error: " in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def check_args(tmp_path: Path, corpus: Path, *overrides: str) -> list:
    """`check` of the tiny launched model (2 ranks, ep_size 2) with ``overrides``."""
    settings = TINY + [f"run_dir={tmp_path / 'run'}", f"data.path={corpus}", f"ds_config={CPU_JSON}", *overrides]
    return ["check", "--world-size", "2"] + [arg for item in settings for arg in ("--set", item)]


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def segments(port: int) -> list:
    """DeepSpeed's shared-memory segments of a job whose rendezvous port is ``port``."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


# --- the run config ------------------------------------------------------------------------------

def test_a_key_given_twice_is_refused_naming_the_file_the_key_and_its_lines(tmp_path, corpus):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  d_model: 32\n  n_heads: 2\ntrain:\n  steps: 3\nmodel:\n  n_layers: 2\n")
    line = error_line(cli(*check_args(tmp_path, corpus), "--config", str(config), cwd=tmp_path), "check")
    assert f"{config}: 'model' is given twice (lines 1 and 6)" in line and "merge them into one" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"], "a refused run creates nothing"

    config.write_text("train:\n  steps: 3\n  lr: 0.01\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: 'train\.steps' is given twice \(lines 2 and 4\)"):
        load_config(config)
    config.write_text("eval:\n  interval: 5\nlogging:\n  interval: 7\n")  # one name in two sections is fine
    assert (load_config(config).eval.interval, load_config(config).logging.interval) == (5, 7)


@pytest.mark.parametrize("text", ["3e-3", "3E-3", "0.3e-2", ".003", "+3e-3"])
def test_floats_in_ordinary_notation_are_numbers_in_files_and_overrides(tmp_path, text):
    config = tmp_path / "run.yaml"
    config.write_text(f"train:\n  lr: {text}\n  betas: [{text}, 9.5e-1]\n")
    from_file = load_config(config)
    from_override = load_config(None, [f"train.lr={text}", f"train.betas=[{text}, 9.5e-1]"])
    for cfg in (from_file, from_override):
        assert cfg.train.lr == 0.003 and cfg.train.betas == [0.003, 0.95]


def test_float_notation_reaches_the_range_checks_and_words_stay_type_errors():
    assert load_config(None, ["train.weight_decay=1E5"]).train.weight_decay == 1e5
    assert load_config(None, ["model.dropout=.5"]).model.dropout == 0.5
    with pytest.raises(ConfigError, match=r"train.grad_clip must be >= 0 \(0 disables clipping\); got -0.25"):
        load_config(None, ["train.grad_clip=-2.5e-1"])
    with pytest.raises(ConfigError, match=r"--set train.lr=3e-3x: 'train.lr' must be a number; got '3e-3x' \(str\)"):
        load_config(None, ["train.lr=3e-3x"])
    with pytest.raises(ConfigError, match=r"'model.d_model' must be an integer; got '1e2' \(str\)"):
        load_config(None, ["model.d_model=1e2"])
    assert load_config(None, ["run_dir=1e5"]).run_dir == "1e5", "strings stay strings"


def test_an_empty_run_dir_is_refused(tmp_path, corpus):
    line = error_line(cli(*check_args(tmp_path, corpus, "run_dir="), cwd=tmp_path), "check")
    assert "run_dir must name a directory; got '', which would write the run into the current directory" in line
    assert list(tmp_path.iterdir()) == []
    config = tmp_path / "run.yaml"
    config.write_text('run_dir: ""\n')
    with pytest.raises(ConfigError, match="run_dir must name a directory; got ''"):
        load_config(config)


# --- the DeepSpeed JSON --------------------------------------------------------------------------

def test_a_ds_config_block_that_is_not_an_object_is_refused(tmp_path, corpus):
    ds = write_json(tmp_path / "ds.json", {"zero_optimization": 2})
    line = error_line(cli(*check_args(tmp_path, corpus, f"ds_config={ds}"), cwd=tmp_path), "check")
    assert f"{ds}: 'zero_optimization' must be a JSON object of settings, e.g. \"zero_optimization\": " \
           '{"stage": 2}; got 2' in line
    for block, value in (("bf16", True), ("fp16", ["enabled"])):
        write_json(ds, {block: value})
        with pytest.raises(ConfigError, match=f"'{block}' must be a JSON object of settings"):
            load_ds_config(ds, load_config(None), world_size=2)
    assert not (tmp_path / "run").exists()


def test_a_ds_config_path_that_is_a_directory_is_refused(tmp_path, corpus):
    error_line(cli(*check_args(tmp_path, corpus, f"ds_config={tmp_path}"), cwd=tmp_path), "check",
               f"DeepSpeed config {tmp_path} is a directory, not a JSON file; set ds_config to one of ds_configs/")
    with pytest.raises(ConfigError, match=f"run config {tmp_path} is a directory, not a file"):
        load_config(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_precision_the_accelerator_cannot_train_in_is_refused_before_any_rank_works(tmp_path, corpus):
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    bf16 = write_json(tmp_path / "bf16.json", {**json.loads(CPU_JSON.read_text()), "bf16": {"enabled": True}})
    if accelerator.is_bf16_supported():  # what DeepSpeed can run is accepted
        preflight(load_config(None, TINY + [f"run_dir={tmp_path / 'run'}", f"data.path={corpus}",
                                            f"ds_config={bf16}"]), world=2, resume=False)
    if accelerator.is_fp16_supported():
        pytest.skip(f"DeepSpeed's {accelerator.device_name()} accelerator trains in fp16 on this machine")
    fp16 = write_json(tmp_path / "fp16.json", {**json.loads(CPU_JSON.read_text()), "fp16": {"enabled": True}})
    needle = f"{fp16}: 'fp16.enabled' is true, but DeepSpeed's {accelerator.device_name()} accelerator cannot " \
             "train in fp16 on this machine"
    error_line(cli(*check_args(tmp_path, corpus, f"ds_config={fp16}"), cwd=tmp_path), "check", needle,
               "remove the 'fp16' block")
    # Under the launcher the ranks refuse it in pre-flight: before DeepSpeed starts, with nothing written.
    port = free_port()
    proc = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port",
                           str(port), "--module", "sparsemixer_ds.cli", "train", "--set", f"run_dir={tmp_path / 'run'}",
                           "--set", f"data.path={corpus}", "--set", f"ds_config={fp16}"] + set_args("moe.ep_size=1"),
                          cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"sparsemixer-ds train: error: {needle}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not segments(port)


# --- the data ------------------------------------------------------------------------------------

def test_an_unreadable_meta_json_is_refused_naming_the_file(tmp_path, corpus):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.bin", "val.bin"):
        (data / name).write_bytes((corpus / name).read_bytes())
    (data / "meta.json").write_text('{"tokenizer": "bytes",')
    error_line(cli(*check_args(tmp_path, corpus, f"data.path={data}"), cwd=tmp_path), "check",
               f"{data / 'meta.json'} is not valid JSON (", f"delete {data} and prepare it again")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("meta, problem", [
    ({"tokenizer": "bytes", "dtype": "uint16"}, "has no 'vocab_size' (an integer >= 1)"),
    ({"tokenizer": "bytes", "vocab_size": 257}, "has no 'dtype' (one of uint16, uint32)"),
    ({"tokenizer": "bytes", "vocab_size": "257", "dtype": "uint16"}, "has 'vocab_size': \"257\", not an integer"),
    ({"tokenizer": "words", "vocab_size": 257, "dtype": "uint16"}, "has 'tokenizer': \"words\", not one of bytes, bpe"),
    ([257], "holds a JSON list, not an object"),
])
def test_a_meta_json_without_what_the_readers_need_is_refused(tmp_path, meta, problem):
    write_json(tmp_path / "meta.json", meta)
    with pytest.raises(ValueError) as err:
        read_meta(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'meta.json'} {problem}")
    assert "sparsemixer-ds prepare" in str(err.value)


def write_inputs(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_text("plain text\n")
    (root / "b.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    (root / "c.txt").write_bytes("ab".encode("utf-16-le"))  # NUL bytes: not text
    return root


def test_prepare_refuses_text_that_is_not_utf8_by_default(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    error_line(cli("prepare", str(inputs / "a.txt"), str(inputs / "b.txt"), "--out", "out", "--quiet", cwd=tmp_path),
               "prepare", f"{inputs / 'b.txt'}: not UTF-8 text: byte 0xe9 at byte offset 3",
               "--encoding-errors skip")
    error_line(cli("prepare", str(inputs / "c.txt"), "--out", "out", "--quiet", cwd=tmp_path), "prepare",
               f"{inputs / 'c.txt'}: a binary file, not text: a NUL byte at byte offset 1")
    assert not (tmp_path / "out").exists()
    jsonl = tmp_path / "in" / "d.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text: byte 0xe9 at byte offset 28"):
        list(iter_documents([jsonl]))
    assert list(iter_documents([jsonl], encoding_errors="skip")) == [(f"{jsonl}:1", "ok")]


@pytest.mark.parametrize("policy, kept", [("skip", ["plain text\n"]),
                                          ("replace", ["plain text\n", "caf\ufffd au lait\n", "a\0b\0"])])
def test_prepare_skips_or_replaces_on_request_and_counts(tmp_path, policy, kept):
    write_inputs(tmp_path / "in")
    proc = cli("prepare", "in", "--out", "out", "--quiet", "--val-fraction", "0", "--encoding-errors", policy,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"; 2 document(s) not UTF-8 text {'left out' if policy == 'skip' else 'kept with U+FFFD'}" in proc.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["encoding_errors"], meta["not_text_documents"]) == (policy, 2)
    assert meta["train_tokens"] == sum(len(text.encode()) + 1 for text in kept)  # bytes and an eos each


def test_the_default_corpus_keeps_its_few_non_utf8_sources_with_replacements(tmp_path, monkeypatch):
    import sparsemixer_ds.data.prepare as preparing
    sources = write_inputs(tmp_path / "stdlib")
    monkeypatch.setattr(preparing, "default_corpus", lambda: sorted(sources.iterdir()))
    meta = prepare(None, tmp_path / "out", val_fraction=0.0, progress=False)
    assert (meta["encoding_errors"], meta["not_text_documents"], meta["documents"]["train"]) == ("replace", 2, 3)


def test_prepare_refuses_an_out_that_is_a_file_or_holds_prepared_data(tmp_path):
    write_inputs(tmp_path / "in")
    (tmp_path / "afile").write_text("mine")
    error_line(cli("prepare", "in/a.txt", "--out", "afile", "--quiet", cwd=tmp_path), "prepare",
               "output directory afile is a file, not a directory; choose another --out")
    error_line(cli("prepare", "in/a.txt", "--out", "afile/data", "--quiet", cwd=tmp_path), "prepare",
               "output directory afile/data: afile is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "mine"
    prepare([str(tmp_path / "in" / "a.txt")], tmp_path / "data", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    error_line(cli("prepare", "in/a.txt", "--out", "data", "--quiet", cwd=tmp_path), "prepare",
               f"output directory data already holds prepared data ({Path('data') / 'meta.json'}); choose another "
               "--out, or delete it")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


# --- the machine: world size, memory, the rendezvous port -----------------------------------------

def test_check_refuses_a_world_size_below_one(tmp_path, corpus):
    args = check_args(tmp_path, corpus)
    args[args.index("--world-size") + 1] = "0"
    error_line(cli(*args, cwd=tmp_path), "check", "--world-size must be >= 1", "got 0")


def test_a_model_too_big_for_the_machine_is_refused_with_the_estimate(tmp_path, corpus):
    # About 1 TiB per rank: more than any machine this runs on has, GPU or CPU.
    big = ["model.d_model=8192", "model.n_heads=64", "moe.num_experts=64", "moe.expert_hidden=65536"]
    line = error_line(cli(*check_args(tmp_path, corpus, *big), cwd=tmp_path), "check",
                      "the model does not fit: about ", " GiB per rank before activations (weights ",
                      " + gradients ", " + AdamW state ", "parameters on each rank", "ZeRO stage 2 in",
                      "but this machine has ", " GiB available", "more ranks with a larger moe.ep_size (now 2")
    assert not (tmp_path / "run").exists(), line


def test_the_memory_estimate_counts_the_parameters_each_rank_holds(corpus):
    cfg = load_config(None, TINY_MODEL + [f"data.path={corpus}", "model.vocab_size=257"])
    model = get_family(cfg).build(cfg)
    expert = sum(p.numel() for name, p in model.named_parameters() if ".deepspeed_experts." in name)
    total = sum(p.numel() for p in model.parameters())
    fp32 = get_family(cfg).memory_estimate(cfg, {}, world=1)
    assert (fp32.params, fp32.expert_params, fp32.zero_stage) == (total, expert, 0)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * total, 4 * total, 8 * total)
    cfg.moe.ep_size = 2  # each rank builds half the experts
    assert get_family(cfg).memory_estimate(cfg, {}, world=2).expert_params == expert // 2
    # bf16 with ZeRO-2 over 4 ranks, ep_size 2: dense state over 4 ranks, expert state over 2.
    state = training_state(1000, 400, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 4, 2)
    assert (state.weights, state.gradients, state.optimizer) == (2 * 1400, 2 * (250 + 200), 12 * (250 + 200))


def test_check_refuses_a_master_port_in_use_on_this_host(tmp_path, corpus):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        error_line(cli(*check_args(tmp_path, corpus), "--master-addr", "localhost", "--master-port", str(port),
                       cwd=tmp_path), "check", f"master port {port} on localhost cannot be used for the rendezvous "
                       "(Address already in use)", "pass a free port with --master-port to the launch script")
        # Another host's ports are not visible from here: not checked.
        proc = cli(*check_args(tmp_path, corpus), "--master-addr", "192.0.2.1", "--master-port", str(port),
                   cwd=tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr
    error_line(cli(*check_args(tmp_path, corpus), "--master-port", "70000", cwd=tmp_path), "check",
               "--master-port must be a TCP port, 1 to 65535; got 70000")


def test_training_on_a_master_port_in_use_says_so_and_leaves_nothing(tmp_path, corpus):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                               str(port), "--module", "sparsemixer_ds.cli", "train", "--set",
                               f"run_dir={tmp_path / 'run'}", "--set", f"data.path={corpus}"] + set_args(),
                              cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"sparsemixer-ds train: error: master port {port} on 127.0.0.1 cannot be used for the rendezvous " \
           "(Address already in use)" in proc.stderr and "--master-port" in proc.stderr
    assert "Traceback" not in proc.stderr and "1800" not in proc.stderr
    assert not (tmp_path / "run").exists() and not segments(port)


# Two ranks of another job that met at a port and wait there (argv: port, rank).
OTHER_JOB = """
import sys, time
import torch.distributed as dist
port, rank = map(int, sys.argv[1:])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
dist.barrier()
print("formed", flush=True)
time.sleep(600)
"""


def connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an established TCP connection to ``port``."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            inodes.add(os.readlink(fd))
    except OSError:  # it exited, or closed that descriptor meanwhile
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # torch's store client may use an IPv4-mapped IPv6 socket
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and f"socket:[{fields[9]}]" in inodes:
                return True
    return False


def test_a_rank_that_joins_another_jobs_rendezvous_leaves_no_segment(tmp_path, corpus):
    """The other ranks of a job whose rank 0 found its port taken meet whatever listens there. Joining
    another job's rendezvous, a rank used to create its shared-memory segment and wait for its peers'
    until the launcher killed it, leaving the segment behind."""
    port = free_port()
    other = [subprocess.Popen([sys.executable, "-c", OTHER_JOB, str(port), str(rank)], stdout=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    rank1 = None
    try:
        assert other[0].stdout.readline().strip() == "formed"
        env = dict(launch_env(), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        rank1 = subprocess.Popen([sys.executable, "-m", "sparsemixer_ds.cli", "train", "--set",
                                  f"run_dir={tmp_path / 'run'}", "--set", f"data.path={corpus}"] + set_args(),
                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while rank1.poll() is None and not connected(rank1.pid, port):
            assert time.monotonic() < deadline, "the rank never reached the other job's rendezvous"
            time.sleep(0.2)
        time.sleep(5)  # the old code had its segment a moment after connecting
        assert rank1.poll() is None, f"the rank should wait for its group: {rank1.stderr.read()[-3000:]}"
        assert not segments(port)
        rank1.send_signal(signal.SIGTERM)  # what the launcher does once rank 0 has failed
        rank1.wait(timeout=60)
        assert not segments(port) and not (tmp_path / "run").exists()
    finally:
        for proc in other + [rank1]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


# --- generate -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--tokens", "-1"], "--tokens must be >= 0 (new tokens to sample); got -1"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0 (0: greedy"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy, 1: the model's own "
                               "distribution); got nan"),
    (["--top-k", "-3"], "--top-k must be >= 0 (0: sample among all tokens); got -3"),
])
def test_generate_refuses_bad_sampling_settings_before_loading_the_model(tmp_path, args, needle):
    # The export does not exist: a refusal that names it would mean the model was looked for first.
    error_line(cli("generate", "--export", str(tmp_path / "missing.safetensors"), *args, cwd=tmp_path), "generate",
               needle)
