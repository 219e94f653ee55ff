"""One run per run directory (sparsemixer_ds/run/runlock.py): a second launch on a directory in use is refused
before any rank starts, naming who holds it; a lock left by a run that is gone is taken over with a warning."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import REPO, free_port, launch_env, run_metrics, set_args

from sparsemixer_ds.config import ConfigError
from sparsemixer_ds.run.runlock import LOCK_NAME, STALE_AFTER_S, RunLock, check_lock

SHORT = ["train.steps=40", "eval.interval=40", "checkpoint.interval=40", "logging.plot=false"]


def local(run_dir, corpus, *overrides):
    return ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(free_port()), "--",
            *set_args(f"run_dir={run_dir}", f"data.path={corpus}", *SHORT, *overrides)]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_launch_on_a_directory_in_use_is_refused_before_any_rank_starts(tmp_path, corpus):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(local(run_dir, corpus), cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (run_dir / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.05)
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        second = subprocess.run(local(run_dir, corpus), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                                timeout=120)
        out = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run_dir {run_dir} is in use by another run: host {socket.gethostname()}, pid {holder['pid']}" \
        in second.stderr, second.stderr[-3000:]
    assert "[rank" not in second.stdout + second.stderr, "refused before any rank started"
    assert first.returncode == 0, out[-3000:]
    steps = [m["step"] for m in run_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, 41)), "the first run's records only, once each"
    assert not (run_dir / LOCK_NAME).exists(), "released when the run ended"


def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": None, "boot_id": "", "token": "other",
              "role": "rank 0 of sparsemixer-ds train", "since": "2026-01-01T00:00:00+0000", **fields}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    return run_dir / LOCK_NAME


def test_a_lock_left_by_a_dead_process_is_taken_over_by_a_real_launch(tmp_path, corpus):
    run_dir = tmp_path / "run"
    pid = dead_pid()
    write_lock(run_dir, pid=pid)
    proc = subprocess.run(local(run_dir, corpus, "train.steps=3"), cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"WARNING: taking over {run_dir / LOCK_NAME} from a run that is gone" in proc.stderr
    assert f"process {pid} no longer exists" in proc.stderr
    assert not (run_dir / LOCK_NAME).exists()


def live_lock(run_dir, **fields):
    from sparsemixer_ds.run.runlock import _boot_id
    from sparsemixer_ds.run.stop import process_start_time
    return write_lock(run_dir, **{"start_time": process_start_time(os.getpid()), "boot_id": _boot_id(), **fields})


def test_who_holds_a_lock_decides(tmp_path):
    run_dir = tmp_path / "run"
    live_lock(run_dir)  # this very process: alive
    with pytest.raises(ConfigError, match=f"is in use by another run: host {socket.gethostname()}, pid {os.getpid()}"):
        check_lock(run_dir, "mine")
    assert check_lock(run_dir, "other") is None, "the same launch's own lock"
    live_lock(run_dir, boot_id="an-earlier-boot")
    assert "the machine has rebooted since" in check_lock(run_dir, "mine")
    live_lock(run_dir, start_time=1)  # the pid is reused by another process now
    assert f"process {os.getpid()} no longer exists" in check_lock(run_dir, "mine")
    lock = write_lock(run_dir, host="node-elsewhere", pid=1234)
    with pytest.raises(ConfigError, match="host node-elsewhere, pid 1234"):
        check_lock(run_dir, "mine")  # another host, refreshed just now: it may be running
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    assert "not refreshed for" in check_lock(run_dir, "mine")
    lock.write_text("{\"host\": ")  # cut short
    assert "unreadable" in check_lock(run_dir, "mine")


def test_of_two_takers_at_once_one_wins_and_release_is_for_the_holder_only(tmp_path):
    run_dir = tmp_path / "run"
    mine = RunLock(run_dir, "mine", "test").acquire()
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunLock(run_dir, "theirs", "test").acquire()
    RunLock(run_dir, "theirs", "test", pid=dead_pid()).release()  # not its lock: nothing happens
    assert mine.held()
    mine.release()
    assert not (run_dir / LOCK_NAME).exists()
