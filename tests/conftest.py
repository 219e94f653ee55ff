"""Shared test set-up: DeepSpeed on the CPU (gloo) unless a GPU is really there, and a launcher helper."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from sparsemixer_ds.testing import TINY as TINY_MODEL  # noqa: E402
from sparsemixer_ds.testing import free_port, run_metrics  # noqa: E402,F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


# The files with the most work, first: `make test` hands whole files to two workers (pytest-xdist, --dist
# loadfile) in collection order, and a long file left for last would run alone while the other worker idles.
LONGEST_FIRST = ("test_train.py", "test_launch.py", "test_benchmarks.py", "test_hf_family.py", "test_hf_checkpoint.py",
                 "test_stall.py", "test_autoep.py", "test_integrity.py", "test_launch_slurm.py", "test_errors.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "alone: runs with no other test beside it (make test runs these after the rest)")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: each file's tests keep their order


# Where a job's ranks meet. A test that made a world of one in this process (an in-process export, say) left
# them in os.environ, with the port held by this process: a job inheriting them would find its port taken.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")


def launch_env() -> dict:
    """The environment a launched job needs: this venv's bin first (the same ninja, the same python), and no
    rendezvous of this process's own (each job makes its own)."""
    env = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def world_of_one():
    """A process group of one rank in this process, for deepspeed.initialize (AutoEP builds its layers in it)."""
    from sparsemixer_ds.run.comm import single_process_group
    single_process_group()


@pytest.fixture
def deepspeed_run(tmp_path):
    """Run ``script`` under the real ``deepspeed`` launcher with N local ranks.

    The script gets ``--out DIR``; each rank writes its results there, and ``run`` returns DIR after
    checking that the job succeeded.
    """

    def run(script: str, num_procs: int, *args: str, timeout: float = 300.0) -> Path:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(num_procs), "--master_port", str(free_port()),
               str(REPO / "tests" / "dist" / script), "--out", str(tmp_path), *args]
        proc = subprocess.run(cmd, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log}"
        return tmp_path

    return run


# The tiny model for launched runs: 2 MoE layers of 4 experts over 2 ranks (ep_size 2), seconds per run. MFU's peak
# is given, not measured at every start (half a CPU-second a rank): tests/test_flops.py measures it (peak_tflops=0).
TINY = TINY_MODEL + ["moe.moe_every=1", "moe.ep_size=2", "train.warmup_steps=2", "train.lr=0.01", "eval.batches=2",
                     "logging.interval=1", "logging.progress=false", "train.peak_tflops=0.1"]


def set_args(*overrides: str) -> list:
    """``--set`` pairs for the tiny model plus ``overrides``."""
    return [arg for item in TINY + list(overrides) for arg in ("--set", item)]


def rank_pids(marker: str) -> dict:
    """RANK -> pid of the training processes whose command line contains ``marker``."""
    pids = {}
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "sparsemixer_ds.cli train" in cmdline:
            for item in environ:
                if item.startswith(b"RANK="):
                    pids[int(item[5:])] = int(proc_dir.name)
    return pids


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A byte-level slice of the stdlib sources: big enough for a few dozen steps, quick to prepare."""
    from sparsemixer_ds.data.corpus import default_corpus
    from sparsemixer_ds.data.prepare import prepare
    out = tmp_path_factory.mktemp("data") / "stdlib-slice"
    prepare([str(p) for p in default_corpus()[:60]], out, tokenizer="bytes", val_fraction=0.1, progress=False)
    return out


def assert_resumed_as_uninterrupted(run_dir, finished_run, from_step):
    """After the ``resumed`` record, the run logged what the uninterrupted one did, to the last step."""
    full, records = run_metrics(finished_run), run_metrics(run_dir)
    marks = [i for i, m in enumerate(records) if m.get("resumed")]
    assert len(marks) == 1 and records[marks[0]]["step"] == from_step
    saved = [m for m in full if m["step"] == from_step and "val_loss" in m][0]
    assert records[marks[0]]["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-6), "the model as saved"
    want = [m for m in full if m["step"] > from_step]
    got = records[marks[0] + 1:]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for w, g in zip(want, got):
        for key in ("loss", "balance_loss", "lr", "val_loss"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (w["step"], key)
