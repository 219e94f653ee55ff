"""Shared test set-up: DeepSpeed on the CPU (gloo) unless a GPU is really there, and a launcher helper."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    """The environment a launched job needs: this venv's bin first (the same ninja, the same python)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def deepspeed_run(tmp_path):
    """Run ``script`` under the real ``deepspeed`` launcher with N local ranks.

    The script gets ``--out DIR``; each rank writes its results there, and ``run`` returns DIR after
    checking that the job succeeded.
    """

    def run(script: str, num_procs: int, *args: str, timeout: float = 300.0) -> Path:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(num_procs), "--master_port", str(_free_port()),
               str(REPO / "tests" / "dist" / script), "--out", str(tmp_path), *args]
        proc = subprocess.run(cmd, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log}"
        return tmp_path

    return run
