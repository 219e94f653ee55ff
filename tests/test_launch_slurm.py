"""SLURM batch launch (launch/slurm.sbatch) on a real one-node SLURM cluster that this module starts.

munged, slurmctld and slurmd run from a private directory with their own munge socket and key, loopback
ports, state and logs: a munge or SLURM already on the machine is neither used nor touched.
"""
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port, launch_env, run_metrics, set_args

SCRIPT = REPO / "launch" / "slurm.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
# Job states after which a job has left the queue for good.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def wait_for(condition, timeout: float, what: str, details=lambda: "", interval: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` and ``details()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(interval)


def processes(cmdline_part: str = "", env_entry: str = "") -> dict:
    """{pid: argv} of the live processes whose command line contains ``cmdline_part`` and whose
    environment holds ``env_entry`` (e.g. 'RANK=1'); zombies have an empty command line and never match."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            environ = (entry / "environ").read_bytes().split(b"\0") if env_entry else []
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        args = [a.decode(errors="replace") for a in argv]
        if args and cmdline_part in " ".join(args) and (not env_entry or env_entry.encode() in environ):
            found[int(entry.name)] = args
    return found


@dataclass
class Cluster:
    root: Path  # config, state, spool and logs of every daemon
    conf: Path  # slurm.conf
    host: str  # the one node's name
    env: dict  # launch_env() with SLURM_CONF: for sbatch, squeue, scontrol and the jobs they start

    def run(self, *cmd: str, timeout: float = 30) -> str:
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n{self.logs()}"
        return proc.stdout

    def logs(self) -> str:
        parts = []
        for log in sorted([*self.root.rglob("*.log"), *self.root.rglob("*.out")]):
            parts.append(f"--- {log.name} (last lines) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {field: value}: JobState, ExitCode, ..."""
        line = self.run("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_done(self, job_id: str, timeout: float, output: Path) -> dict:
        def details():
            text = output.read_text(errors="replace")[-4000:] if output.exists() else "(no output file)"
            return f"job {job_id}: {self.job(job_id)}\n--- job output ---\n{text}\n{self.logs()}"

        return wait_for(lambda: (info := self.job(job_id)) and info.get("JobState") in FINAL_STATES and info,
                        timeout, f"job {job_id} to finish", details)

    def submit(self, output: Path, *script_args: str, sbatch: tuple = ()) -> str:
        out = self.run("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={output}",
                       f"--chdir={REPO}", *sbatch, str(SCRIPT.relative_to(REPO)), *script_args)
        return out.strip().split(";")[0]


def slurm_conf(root: Path, host: str, cpus: int, munge_socket: Path) -> str:
    return f"""\
ClusterName=sparsemixer-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster (munged, slurmctld, slurmd in the foreground, children of this process),
    stopped and checked gone afterwards, also when a test or the start-up fails."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)} (Debian: apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip(f"starting slurmd and munged needs root; running as uid {os.geteuid()}")
    try:
        munge_user = pwd.getpwnam("munge")
    except KeyError:
        pytest.skip("no 'munge' user to run munged as (the munge package creates it)")
    cpus = len(os.sched_getaffinity(0))  # what `nproc` says; slurmd drains a node configured with more than it finds
    if cpus < 2:
        pytest.skip(f"a 2-rank job needs 2 CPUs under SLURM's CR_Core selection; this process may use {cpus}")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        pytest.skip(f"this host's name {host!r} does not resolve ({err}); the ranks meet at it as MASTER_ADDR")

    # Not under pytest's tmp dir: that is private to root, and munged (as munge) must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    root.chmod(0o755)
    munge_dir = root / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o755)  # munged refuses a socket directory without execute permission for all
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge_dir, key):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    munge_socket = munge_dir / "munge.socket"
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, cpus, munge_socket))
    env = {**launch_env(), "SLURM_CONF": str(conf)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    cluster = Cluster(root, conf, host, env)

    daemons = []
    try:
        def start(cmd, log, **kwargs):
            with open(root / "log" / log, "ab") as out:
                daemons.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True, **kwargs))
            return daemons[-1]

        munged = start(["munged", "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
                        f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                        f"--seed-file={munge_dir / 'munged.seed'}"], "munged.out",
                       user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])
        wait_for(lambda: munge_socket.exists() or munged.poll() is not None, 20, "munged's socket", cluster.logs)
        assert munged.poll() is None, f"munged exited {munged.returncode}\n{cluster.logs()}"
        start(["slurmctld", "-D", "-f", str(conf)], "slurmctld.out")
        start(["slurmd", "-D", "-f", str(conf), "-N", host], "slurmd.out")

        def node_idle():
            dead = [p.args[0] for p in daemons if p.poll() is not None]
            assert not dead, f"{', '.join(dead)} exited during start-up\n{cluster.logs()}"
            state = subprocess.run(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], env=env, capture_output=True,
                                   text=True, timeout=30)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        wait_for(node_idle, 60, f"node {host} to be idle in sinfo", cluster.logs, interval=1)
        yield cluster
    finally:
        if daemons and all(p.poll() is None for p in daemons):
            subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
            queue = lambda: subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30).stdout
            wait_for(lambda: not queue().strip(), 60, "scancel to empty the queue", queue)
        for proc in reversed(daemons):  # slurmd, slurmctld, then munged
            stop(proc)
        # Every process the cluster started carries SLURM_CONF in its environment: none may be left.
        left = processes(env_entry=f"SLURM_CONF={conf}")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster were still running after it stopped (now killed): {left}"


def test_two_ranks_train_under_sbatch(slurm, tmp_path, corpus):
    """A Hugging Face PhiMoE (family hf) under sbatch and srun."""
    output = tmp_path / "slurm-%j.out"
    run_dir = tmp_path / "run"
    hf = str(REPO / "tests" / "fixtures" / "tiny_phimoe.yaml")
    job_id = slurm.submit(output, "--config", hf, "--master-port", str(free_port()), "--", *set_args(
        f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=6", "eval.interval=3", "checkpoint.interval=3"))
    output = tmp_path / f"slurm-{job_id}.out"
    info = slurm.wait_done(job_id, 300, output)
    text = output.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{text[-4000:]}"
    assert "[rank 0/2]" in text and "[rank 1/2]" in text, text[-4000:]
    assert "local rank 1" in text, "SLURM_LOCALID reaches the rank as LOCAL_RANK"
    assert "final validation loss" in text, text[-4000:]
    metrics = run_metrics(run_dir)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 7))
    assert [m["step"] for m in metrics if "val_loss" in m] == [3, 6]


def test_a_killed_rank_ends_the_job(slurm, tmp_path, corpus):
    output = tmp_path / "slurm-%j.out"
    run_dir = tmp_path / "endless-run"
    job_id = slurm.submit(output, "--master-port", str(free_port()), "--", *set_args(
        f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=100000"))
    output = tmp_path / f"slurm-{job_id}.out"
    wait_for(lambda: output.exists() and "[rank 1/2]" in output.read_text(), 120, "rank 1 to start",
             lambda: f"{slurm.job(job_id)}\n{output.read_text() if output.exists() else ''}\n{slurm.logs()}")
    rank1 = {pid: argv for pid, argv in processes(str(run_dir), "RANK=1").items() if "sparsemixer_ds.cli" in argv}
    assert len(rank1) == 1, f"expected one python process of rank 1, found {rank1}"
    os.kill(next(iter(rank1)), signal.SIGKILL)
    # Without --kill-on-bad-exit=1 rank 0 waits for rank 1 forever and the job never ends.
    info = slurm.wait_done(job_id, 90, output)
    assert info["JobState"] == "FAILED", f"{info}\n{output.read_text()[-4000:]}"
    wait_for(lambda: not processes(str(run_dir)), 30, "the job's processes to end", lambda: str(processes(str(run_dir))))


def test_dry_run_prints_the_srun_command_and_refusals_are_clear(tmp_path, corpus):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not on PATH (Debian: apt-get install slurm-client); the script expands node lists with it")
    # scontrol reads a slurm.conf even to expand host names; without one it asks DNS for the controller.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=dry-run\nSlurmctldHost=localhost\n")
    pwned = tmp_path / "pwned"
    odd_run_dir = f"run_dir={tmp_path}/a b;$(touch {pwned})"
    train = ["--set", odd_run_dir, "--set", "train.steps=3", "--set", f"data.path={corpus}"]
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), SLURM_JOB_NODELIST="node[07-08]", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2")
    port = str(free_port())

    def script(*args, **overrides):
        run_env = {k: v for k, v in {**env, **overrides}.items() if v is not None}
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=run_env, capture_output=True, text=True,
                              timeout=120)

    proc = script("--dry-run", "--master-port", port, "--", *train)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("srun ")][-1]
    words = shlex.split(line)
    assert "--kill-on-bad-exit=1" in words and "--ntasks-per-node=2" in words and "--nodes=2" in words, line
    assert words[words.index("--config"):] == ["--config", "configs/cpu_small.yaml", *train], line
    assert not pwned.exists()

    # What srun would start on each task: the wrapper, here with rank 3's SLURM variables and a python
    # that records what it was given.
    c = words.index("-c")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text('#!/bin/sh\nenv > "$OUT/env"\nprintf "%s\\0" "$@" > "$OUT/args"\n')
    (fake_bin / "python").chmod(0o755)
    task_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "OUT": str(tmp_path), "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
                "SLURM_LOCALID": "1"}
    subprocess.run(["bash", *words[c:]], env=task_env, check=True, timeout=30)
    args = (tmp_path / "args").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in args] == ["-m", "sparsemixer_ds.cli", "train", "--config", "configs/cpu_small.yaml",
                                          *train]
    task = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert {k: task.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "node07",
         "MASTER_PORT": port}
    assert not pwned.exists()

    proc = script("--", *train)
    assert proc.returncode == 2 and "not inside a SLURM allocation (no SLURM_JOB_ID)" in proc.stderr, proc.stderr
    proc = script("--dry-run", "--", *train, SLURM_NTASKS_PER_NODE=None)
    assert proc.returncode == 2 and "SLURM_NTASKS_PER_NODE is not set: submit with --ntasks-per-node" in proc.stderr, \
        proc.stderr
    proc = script("--dry-run", "--", *train, SLURM_NTASKS="3")
    assert proc.returncode == 2 and "give every node the same number of tasks" in proc.stderr, proc.stderr


def test_scancel_stops_the_ranks_with_a_checkpoint(slurm, tmp_path, corpus):
    output = tmp_path / "slurm-%j.out"
    run_dir = tmp_path / "preempted-run"
    job_id = slurm.submit(output, "--master-port", str(free_port()), "--", *set_args(
        f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=100000", "checkpoint.interval=0"))
    output = tmp_path / f"slurm-{job_id}.out"
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(run_metrics(run_dir)) >= 2, 180, "training steps",
             lambda: f"{slurm.job(job_id)}\n{output.read_text() if output.exists() else ''}")
    slurm.run("scancel", job_id)
    cancelled = time.monotonic()
    info = slurm.wait_done(job_id, 60, output)
    text = output.read_text()
    assert info["JobState"] == "CANCELLED", f"{info}\n{text[-4000:]}"
    wait_for(lambda: not processes(str(run_dir)), 30, "the job's processes to end", lambda: str(processes(str(run_dir))))
    assert time.monotonic() - cancelled < 25 + 10, "within train.stop_grace_s (25) and SLURM's KillWait"
    stopped = run_metrics(run_dir)[-1]
    assert stopped["stopped"] == "SIGTERM", stopped
    assert (run_dir / "checkpoints" / f"step_{stopped['step']:08d}" / "COMPLETE").is_file()
    assert f"stopped: at step {stopped['step']} on request (SIGTERM)" in text, text[-4000:]


def test_a_job_near_its_time_limit_is_signalled_and_saves(slurm, tmp_path, corpus):
    # slurm.sbatch asks for SIGTERM 120 s before the limit: with 3 minutes, one minute in.
    output = tmp_path / "slurm-%j.out"
    run_dir = tmp_path / "timed-run"
    submitted = time.monotonic()
    job_id = slurm.submit(output, "--master-port", str(free_port()), "--", *set_args(
        f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=100000", "checkpoint.interval=0",
        "logging.interval=50"), sbatch=("--time=3",))
    output = tmp_path / f"slurm-{job_id}.out"
    info = slurm.wait_done(job_id, 170, output)
    text = output.read_text()
    assert time.monotonic() - submitted < 170, "ended before the time limit"
    assert info["JobState"] != "TIMEOUT", f"{info}\n{text[-4000:]}"
    stopped = run_metrics(run_dir)[-1]
    assert stopped["stopped"] == "SIGTERM", f"{stopped}\n{text[-4000:]}"
    assert (run_dir / "checkpoints" / f"step_{stopped['step']:08d}" / "COMPLETE").is_file()
    assert f"stopped: at step {stopped['step']} on request (SIGTERM)" in text, text[-4000:]
