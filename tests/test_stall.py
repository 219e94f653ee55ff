"""A stalled rank ends the job (sparsemixer_ds/run/watchdog.py): the rules on made-up heartbeats, the
sampler on a thread that waits in a "collective", the process groups' timeout, and real 2-rank runs
under the deepspeed launcher with one rank SIGSTOPped (rank 1; rank 0, which serves the store) or
hanging alive outside any collective (tests/dist/stalled_train.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO, free_port, launch_env, rank_pids, set_args

from sparsemixer_ds.run.watchdog import TORCH_DISTRIBUTED, Seen, Watchdog, margin_s, verdict

T = 15  # train.collective_timeout_s of the launched runs
# deepspeed's launch.py sends SIGTERM to every rank once one fails and SIGKILL 30 s later to those
# still there: a stopped process keeps SIGTERM pending until then.
LAUNCHER_GRACE_S = 30
SLACK_S = 5  # a loaded machine: the launcher polls once a second, threads wait for CPU


def beat(n, step=12, phase="train step", collective="", waiting_s=0.0, still_s=1.0, where="model.py:1 in forward"):
    return {"beat": n, "host": "node-a", "pid": 100 + n, "step": step, "phase": phase, "where": where,
            "collective": collective, "waiting_s": waiting_s, "still_s": still_s}


def test_a_rank_silent_for_the_timeout_is_stopped():
    seen = {1: Seen(beat(1), alive_at=100.0), 2: Seen(beat(2), alive_at=130.0)}
    assert verdict(130.0, 30, seen) is None
    message = verdict(131.0, 30, seen)
    assert message == ("rank 1 (host node-a, pid 101) has not answered for 31 s (stopped or dead: no heartbeat "
                       "since step 12, in 'train step')")
    assert "rank 3 has not answered for 31 s (stopped or dead: no heartbeat since the job started)" == \
        verdict(131.0, 30, {3: Seen(None, alive_at=100.0)})


def test_rank_0s_silent_store_means_rank_0_stopped():
    seen = {0: Seen(beat(0), alive_at=125.0)}
    message = verdict(131.0, 30, seen, store_ok_at=100.0, store="node-a:29500")
    assert message.startswith("rank 0 (host node-a, pid 100) has not answered for 31 s (stopped or dead: its store "
                              "at node-a:29500 does not answer; last heartbeat at step 12, in 'train step')")
    assert verdict(131.0, 30, seen, store_ok_at=120.0, store="node-a:29500") is None
    # The usual order: the last heartbeat read that moved came a little before the last store answer
    # (the following reads saw the same beat). Its silence reaches the timeout first; the store is
    # still the reason, since it has not answered since.
    seen = {0: Seen(beat(0), alive_at=100.0)}
    message = verdict(130.5, 30, seen, store_ok_at=100.4, store="node-a:29500")
    assert message.startswith("rank 0 (host node-a, pid 100) has not answered for 30 s (stopped or dead: its store "
                              "at node-a:29500 does not answer; last heartbeat at step 12"), message
    # The store answers (rank 0's process runs) but rank 0's beats do not move: its heartbeat is the reason.
    message = verdict(130.5, 30, seen, store_ok_at=130.0, store="node-a:29500")
    assert message == ("rank 0 (host node-a, pid 100) has not answered for 30 s (stopped or dead: no heartbeat "
                       "since step 12, in 'train step')")


def test_a_slow_phase_with_a_live_heartbeat_is_not_a_stall():
    # Rank 1 saves a checkpoint for ten timeouts; rank 0 has waited for it, but not for a whole timeout yet.
    seen = {0: Seen(beat(0, collective="barrier", waiting_s=29.0), alive_at=1000.0),
            1: Seen(beat(1, phase="checkpoint save", still_s=300.0), alive_at=999.0)}
    assert verdict(1000.0, 30, seen, hangs=True) is None


def test_a_rank_outside_collectives_while_another_waits_is_hanging():
    seen = {0: Seen(beat(0, collective="all_to_all_single", waiting_s=31.0), alive_at=1000.0),
            1: Seen(beat(1, still_s=32.0, where="stalled_train.py:25 in hang"), alive_at=999.0)}
    assert verdict(1000.0, 30, seen, hangs=False) is None, "only rank 0, which sees every rank, judges hangs"
    assert verdict(1000.0, 30, seen, hangs=True) == (
        "rank 1 (host node-a, pid 101) is hanging: alive, but outside any collective and at step 12, 'train step', "
        "for 32 s (at stalled_train.py:25 in hang), while other ranks wait in collectives (rank 0 31 s in "
        "all_to_all_single)")


def test_every_rank_in_a_collective_that_never_completes_is_a_hang_in_collectives():
    seen = {0: Seen(beat(0, collective="all_reduce", waiting_s=31.0), alive_at=1000.0),
            1: Seen(beat(1, collective="all_to_all_single", waiting_s=40.0), alive_at=999.0)}
    message = verdict(1000.0, 30, seen, hangs=True)
    assert message.startswith("every rank is hanging in a collective that does not complete")
    assert "rank 0 (host node-a, pid 100) in all_reduce for 31 s" in message and "rank 1" in message


def test_a_rank_that_was_stopped_itself_blames_nobody_when_it_resumes():
    watchdog = Watchdog(30, rank=1, world=2, host="node-a")
    watchdog._saw([json.dumps(beat(0)).encode()], now=100.0)  # rank 0 answered at 100 s, then this rank stopped
    assert watchdog.judge(now=200.0, last=199.5).startswith("rank 0 (host node-a, pid 100) has not answered for 100 s")
    watchdog._saw([json.dumps(beat(0)).encode()], now=100.0)
    assert watchdog.judge(now=200.0, last=100.0) is None, "its own pause, not rank 0's silence"
    assert watchdog.judge(now=229.0, last=228.5) is None
    assert "has not answered for 31 s" in watchdog.judge(now=231.0, last=230.5)


def test_the_heartbeat_sees_the_main_thread_wait_in_a_collective():
    # A "collective" whose code lives in torch.distributed's folder, run by a thread the watchdog takes for main.
    # It blocks in C, as work.wait() does.
    space = {}
    exec(compile("def all_reduce(lock):\n    lock.acquire()\n", TORCH_DISTRIBUTED + "fake_c10d.py", "exec"), space)
    release = threading.Lock()
    release.acquire()
    waiter = threading.Thread(target=space["all_reduce"], args=(release,), daemon=True)
    waiter.start()
    time.sleep(0.1)
    try:
        watchdog = Watchdog(30, rank=0, world=2, host="node-a")
        watchdog._main = waiter.ident
        watchdog.mark(7, "evaluation")
        first, later = watchdog.heartbeat(1000.0), watchdog.heartbeat(1012.0)
    finally:
        release.release()
        waiter.join()
    assert first["collective"] == later["collective"] == "all_reduce"
    assert first["where"].startswith("fake_c10d.py:2 in all_reduce")
    assert (later["step"], later["phase"], later["waiting_s"], later["still_s"]) == (7, "evaluation", 12.0, 12.0)
    assert later["beat"] == first["beat"] + 1 and later["host"] == "node-a" and later["pid"] == os.getpid()
    # The main thread of this test is in no collective.
    assert Watchdog(30, rank=0, world=2).heartbeat(1.0)["collective"] == ""


def test_every_process_group_takes_the_collective_timeout(tmp_path):
    # DeepSpeed makes its expert- and data-parallel groups with new_group(ranks), which took torch's
    # 30-minute default whatever train.collective_timeout_s said.
    script = f"""
import os, torch, torch.distributed as d
from datetime import timedelta
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}", RANK="0", WORLD_SIZE="1")
d.init_process_group("gloo", timeout=timedelta(seconds=40))
before = d.new_group([0])
from sparsemixer_ds.run.comm import set_collective_timeout
set_collective_timeout(7)
after = d.new_group([0])
cpu = torch.device("cpu")
print([g._get_backend(cpu).options._timeout.total_seconds() for g in (d.group.WORLD, before, after)])
"""
    proc = subprocess.run([sys.executable, "-c", script], env=launch_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[7.0, 7.0, 7.0]"


class Job:
    """A 2-rank run under the real deepspeed launcher; its output lines, each with the time it came."""

    def __init__(self, run_dir: Path, corpus: Path, script=None, env=None, *overrides: str) -> None:
        target = [str(script)] if script else ["--module", "sparsemixer_ds.cli"]
        self.port = free_port()
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(self.port),
               "--no_local_rank", *target, "train", *set_args(
                   f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=100000", "eval.interval=100000",
                   "checkpoint.interval=100000", "logging.plot=false", f"train.collective_timeout_s={T}",
                   *overrides)]
        self.run_dir, self.lines = run_dir, []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(launch_env(), **(env or {})), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, path: Path, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not path.exists():
            assert self.proc.poll() is None, self.output()[-4000:]
            assert time.time() < deadline, f"no {path} after {timeout} s:\n{self.output()[-4000:]}"
            time.sleep(0.2)

    def verdict(self):
        """(time, line) of the watchdog's line, or None."""
        found = [(at, line) for at, line in self.lines if line.startswith("sparsemixer-ds train: stopped:")]
        return found[0] if found else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in rank_pids(str(self.run_dir)).values():
            os.kill(pid, signal.SIGKILL)


def finished(job: "Job", since: float):
    """The job's end, once it came: (seconds from ``since`` to the watchdog's line, to the job's end, the line)."""
    code = job.proc.wait(timeout=T + margin_s(T) + LAUNCHER_GRACE_S + SLACK_S + 30)
    ended = time.time() - since
    job.reader.join(timeout=10)
    log = job.output()
    assert code != 0, log[-4000:]
    found = job.verdict()
    assert found, f"no watchdog line:\n{log[-4000:]}"
    return found[0] - since, ended, found[1]


def test_a_stopped_rank_ends_the_job(tmp_path, corpus):
    # Rank 1 stopped in one job, rank 0 (whose process serves the store) in another, side by side.
    jobs = {stopped: Job(tmp_path / f"stop-{stopped}", corpus) for stopped in (1, 0)}
    try:
        pids, stopped_at = {}, {}
        for stopped, job in jobs.items():
            job.wait_for(job.run_dir / "metrics.jsonl")
            pids[stopped] = rank_pids(str(job.run_dir))
            assert set(pids[stopped]) == {0, 1}, f"training ranks not found: {pids[stopped]}"
            os.kill(pids[stopped][stopped], signal.SIGSTOP)
            stopped_at[stopped] = time.time()
        for stopped, job in jobs.items():
            verdict_s, ended_s, line = finished(job, stopped_at[stopped])
            print(f"rank {stopped} stopped: the line after {verdict_s:.1f} s, the job's end after {ended_s:.1f} s"
                  f"\n{line}")
            assert f"stopped: rank {stopped} (host " in line, line
            assert f"pid {pids[stopped][stopped]}) has not answered for" in line, line
            assert "(stopped or dead: " in line and f"train.collective_timeout_s={T}" in line, line
            if stopped == 0:
                assert "its store at " in line and f":{job.port} does not answer" in line, line
            assert T - 1 <= verdict_s <= T + margin_s(T) + SLACK_S, "the verdict comes after the timeout, soon"
            assert ended_s <= T + margin_s(T) + LAUNCHER_GRACE_S + SLACK_S
            assert rank_pids(str(job.run_dir)) == {}, "no rank outlives the job"
    finally:
        for job in jobs.values():
            job.kill()


def test_a_rank_hanging_outside_collectives_ends_the_job(tmp_path, corpus):
    # Rank 1 hangs in one job, rank 0 (which judges hangs, so judges itself) in another, side by side.
    # A hanging rank is alive: the launcher's SIGTERM starts its stop, which gives up after stop_grace_s.
    script = REPO / "tests" / "dist" / "stalled_train.py"
    jobs = {hanging: Job(tmp_path / f"hang-{hanging}", corpus, script, {
        "STALL_RANK": str(hanging), "STALL_STEP": "3", "STALL_MARK": str(tmp_path / f"hanging-{hanging}")},
        "train.stop_grace_s=3") for hanging in (1, 0)}
    try:
        for hanging, job in jobs.items():
            job.wait_for(tmp_path / f"hanging-{hanging}")
        for hanging, job in jobs.items():
            hung_at = float((tmp_path / f"hanging-{hanging}").read_text())
            verdict_s, ended_s, line = finished(job, hung_at)
            print(f"rank {hanging} hangs: the line after {verdict_s:.1f} s, the job's end after {ended_s:.1f} s"
                  f"\n{line}")
            assert f"stopped: rank {hanging} (host " in line, line
            assert "is hanging: alive, but outside any collective and at step 4, 'train step'" in line, line
            assert "stalled_train.py" in line and "in hang_outside_collectives" in line, line
            assert f"while other ranks wait in collectives (rank {1 - hanging} " in line, line
            assert T - 1 <= verdict_s <= T + margin_s(T) + SLACK_S
            assert ended_s <= T + margin_s(T) + 3 + SLACK_S, "the hanging rank exits on the launcher's SIGTERM"
            assert not [p for p in Path("/proc").iterdir() if _runs(p, job.run_dir)], "no rank outlives the job"
    finally:
        for job in jobs.values():
            job.kill()
            for proc_dir in Path("/proc").iterdir():
                if _runs(proc_dir, job.run_dir):
                    os.kill(int(proc_dir.name), signal.SIGKILL)


def _runs(proc_dir: Path, run_dir: Path) -> bool:
    """Whether the process is a rank of the harness run in ``run_dir``."""
    if not proc_dir.name.isdigit():
        return False
    try:
        cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "stalled_train.py train" in cmdline and str(run_dir) in cmdline and "deepspeed" not in cmdline
