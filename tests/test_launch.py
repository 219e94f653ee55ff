"""The launch scripts, each run for real on this machine: local, hostfile over ssh/pdsh, per-node, MPI.

Two "hosts" are 127.0.0.1 and 127.0.0.2, both this machine, reached through an sshd that the tests
start on a loopback port with a throwaway key. SLURM has its own module (test_launch_slurm.py).
"""
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, launch_env, rank_pids, run_metrics, set_args

SHORT = ["train.steps=4", "eval.interval=2", "checkpoint.interval=4", "logging.plot=false"]
# A Hugging Face model (model.family hf) instead of the native one, for the paths that start it below.
HF = ["--config", str(REPO / "tests" / "fixtures" / "tiny_phimoe.yaml")]


def script(name):
    return ["bash", str(REPO / "launch" / name)]


def run(cmd, timeout=300, env=None):
    return subprocess.run(cmd, cwd=REPO, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)


def train_args(run_dir, corpus, *overrides):
    return ["--", *set_args(f"run_dir={run_dir}", f"data.path={corpus}", *SHORT, *overrides)]


def assert_trained(run_dir, proc, steps=4):
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "[rank 0/2]" in log and "[rank 1/2]" in log, "both ranks report"
    losses = [m for m in run_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in losses] == list(range(1, steps + 1))
    assert "final validation loss" in log


def test_local_two_processes(tmp_path, corpus):
    proc = run(script("local.sh") + ["--nproc", "2", "--master-port", str(free_port())] +
               train_args(tmp_path / "run", corpus))
    assert_trained(tmp_path / "run", proc)


def test_a_killed_rank_ends_the_whole_job(tmp_path, corpus):
    run_dir = tmp_path / "doomed"
    cmd = script("local.sh") + ["--nproc", "2", "--master-port", str(free_port())] + train_args(
        run_dir, corpus, "train.steps=100000", "logging.interval=50")
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            assert job.poll() is None, job.stdout.read()[-4000:]
            time.sleep(0.5)
        pids = rank_pids(str(run_dir))
        assert set(pids) == {0, 1}, f"training ranks not found: {pids}"
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
        code = job.wait(timeout=90)
        assert code != 0, "a job that lost a rank must fail"
        assert time.time() - killed_at < 90
        assert rank_pids(str(run_dir)) == {}, "no rank outlives the job"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on a free loopback port of 127.0.0.1 and 127.0.0.2, accepting one throwaway key."""
    sshd_bin, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh-keygen")
    if not Path(sshd_bin).exists() or not keygen or not shutil.which("pdsh") or not shutil.which("ssh"):
        pytest.skip("needs openssh-server, openssh-client and pdsh (make test installs them with apt-get as root)")
    if os.geteuid() != 0:
        pytest.skip("sshd must start as root to accept logins as this user here")
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    shutil.copy(home / "user_key.pub", home / "authorized_keys")
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {home / 'host_key'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile {home / 'sshd.pid'}\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        "AcceptEnv none\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    server = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(home / "sshd_config")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    ssh_args = (f"-p {port} -i {home / 'user_key'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o BatchMode=yes -o LogLevel=ERROR")
    try:
        deadline = time.time() + 30
        while True:
            probe = subprocess.run(["ssh", *shlex.split(ssh_args), "127.0.0.2", "true"], capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert server.poll() is None and time.time() < deadline, f"sshd did not come up: {probe.stderr}"
            time.sleep(0.3)
        yield ssh_args
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_hostfile_over_ssh_and_pdsh_two_nodes(tmp_path, corpus, sshd):
    """A Hugging Face PhiMoE (family hf) on two 'nodes' over ssh and pdsh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes', both this machine\n127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = launch_env()
    env["PDSH_SSH_ARGS_APPEND"] = sshd
    proc = run(script("hostfile.sh") + HF + ["--hostfile", str(hostfile), "--master-addr", "127.0.0.1",
                                             "--master-port", str(free_port()), "--no-ssh-check"]
               + train_args(tmp_path / "run", corpus), env=env)
    assert_trained(tmp_path / "run", proc)
    log = proc.stdout + proc.stderr
    assert "127.0.0.2: [rank 1/2]" in log, "rank 1 ran on the second host, through pdsh"


def test_per_node_launch_forms_one_world(tmp_path, corpus):
    """A Hugging Face PhiMoE (family hf), one rank on each of two 'nodes'."""
    port = str(free_port())
    common = ["--nodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    args = train_args(tmp_path / "run", corpus)
    nodes = [subprocess.Popen(script("node.sh") + HF + ["--node-rank", str(r)] + common + args, cwd=REPO,
                              env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "[rank 0/2]" in outs[0] and "[rank 1/2]" in outs[1], "one world of two, one rank per node"
    assert [m["step"] for m in run_metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3, 4]


def test_a_node_that_never_comes_fails_after_the_collective_timeout(tmp_path, corpus):
    # Node 0 of two starts; node 1 never does. Its rank waits train.collective_timeout_s, then says why.
    cmd = script("node.sh") + ["--node-rank", "0", "--nodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1",
                               "--master-port", str(free_port())]
    start = time.time()
    proc = run(cmd + train_args(tmp_path / "run", corpus, "train.collective_timeout_s=10"), timeout=240)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "the ranks did not form one process group at 127.0.0.1:" in out, out[-3000:]
    assert "train.collective_timeout_s=10 bounds the wait" in out, out[-3000:]
    assert not (tmp_path / "run" / "LOCK").exists(), "the launch that failed released the run directory"
    assert time.time() - start < 180, "bounded by the timeout (plus start-up), not torch's 30-minute default"


@pytest.mark.parametrize("via_deepspeed", [False, True])
def test_mpirun_two_ranks(tmp_path, corpus, via_deepspeed):
    cmd = script("mpi.sh") + ["--nproc", "2", "--master-port", str(free_port()), "--mpirun-arg", "--mca",
                              "--mpirun-arg", "btl_tcp_if_include", "--mpirun-arg", "lo"]
    if via_deepspeed:  # and a Hugging Face PhiMoE (family hf)
        cmd += ["--via-deepspeed"] + HF
    proc = run(cmd + train_args(tmp_path / "run", corpus))
    assert_trained(tmp_path / "run", proc)
    if via_deepspeed:
        assert "cmd = mpirun -n 2" in proc.stdout + proc.stderr, "DeepSpeed's openmpi runner started the ranks"


def test_mpi_hostfile_form_dry_run(tmp_path, corpus):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    proc = run(script("mpi.sh") + ["--hostfile", str(hostfile), "--dry-run"] + train_args(tmp_path / "run", corpus))
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:5] == ["mpirun", "-n", "2", "--hostfile", str(hostfile)]
    assert "MASTER_ADDR=node-a" in cmd
    assert cmd[cmd.index("--config") - 4:cmd.index("--config")] == ["python", "-m", "sparsemixer_ds.cli", "train"]
    assert not (tmp_path / "run").exists(), "a dry run starts nothing"


@pytest.mark.parametrize("name", ["local.sh", "hostfile.sh", "node.sh", "mpi.sh"])
def test_every_script_has_help(name):
    proc = run(script(name) + ["--help"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: launch/{name}")


@pytest.mark.parametrize("name, args, needle", [
    ("local.sh", ["--config", "nope.yaml"], "run config 'nope.yaml' does not exist"),
    ("local.sh", ["--nproc", "two"], "--nproc must be a positive integer, got 'two'"),
    ("local.sh", ["--hostfile", "h"], "option --hostfile is not one of this script's"),
    ("hostfile.sh", [], "--hostfile is required"),
    ("hostfile.sh", ["--hostfile", "missing"], "hostfile 'missing' does not exist"),
    ("node.sh", ["--nodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1"], "--node-rank is required"),
    ("node.sh", ["--node-rank", "2", "--nodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1"], "out of range"),
    ("node.sh", ["--node-rank", "0", "--nodes", "2", "--nproc", "1", "--master-addr", "a;b"], "not a host name"),
    ("mpi.sh", [], "give --nproc K"),
])
def test_bad_launch_input_is_refused_before_anything_starts(name, args, needle):
    proc = run(script(name) + args + ["--dry-run"])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("line, needle", [
    ("127.0.0.1", "expected 'HOST slots=N'"),
    ("127.0.0.1 slots=0", "slots must be >= 1"),
    ("$(touch${IFS}PWNED) slots=1", "is not a host name"),
    ("a;touch${IFS}PWNED slots=1", "is not a host name"),
])
def test_bad_hostfiles_are_refused_and_never_executed(tmp_path, line, needle):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"127.0.0.1 slots=1\n{line}\n")
    proc = subprocess.run(script("hostfile.sh") + ["--hostfile", str(hostfile), "--config",
                                                   str(REPO / "configs" / "cpu_small.yaml"), "--dry-run"], cwd=tmp_path,
                          env=launch_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr and "line 2" in proc.stderr, proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_world_size_must_divide_by_ep_size(tmp_path, corpus):
    proc = run(script("local.sh") + ["--nproc", "3", "--dry-run"] + train_args(tmp_path / "run", corpus))
    assert proc.returncode == 2 and "world size 3 is not divisible by moe.ep_size=2" in proc.stderr


def test_overrides_with_shell_metacharacters_pass_literally(tmp_path, corpus):
    odd = f"run_dir={tmp_path}/a b;$(touch {tmp_path}/PWNED)`touch {tmp_path}/PWNED2`"
    proc = run(script("node.sh") + ["--node-rank", "0", "--nodes", "1", "--nproc", "2", "--master-addr", "127.0.0.1",
                                    "--dry-run", "--", *set_args(f"data.path={corpus}", odd)])
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert odd in cmd, "the override arrives as one literal argument"
    assert not list(tmp_path.glob("PWNED*"))


# --- Preemption: SIGTERM to the launch (sparsemixer_ds/run/stop.py, run_cmd in launch/common.sh) ---------------

LONG = ["train.steps=100000", "checkpoint.interval=0", "eval.interval=100000"]


def start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=REPO, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_steps(job, run_dir, steps=2, timeout=180):
    deadline = time.time() + timeout
    while len([m for m in run_metrics(run_dir) if "loss" in m] if (run_dir / "metrics.jsonl").exists() else []) < steps:
        assert job.poll() is None and time.time() < deadline, job.stdout.read()[-4000:]
        time.sleep(0.05)


def stop_paths(tmp_path, corpus, sshd_args):
    port = str(free_port())
    args = train_args(tmp_path / "run", corpus, *LONG)
    mpi = ["--nproc", "2", "--master-port", port, "--mpirun-arg", "--mca", "--mpirun-arg", "btl_tcp_if_include",
           "--mpirun-arg", "lo"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    return {
        "local.sh": script("local.sh") + ["--nproc", "2", "--master-port", port] + args,
        "node.sh": script("node.sh") + ["--node-rank", "0", "--nodes", "1", "--nproc", "2", "--master-addr",
                                        "127.0.0.1", "--master-port", port] + args,
        "mpi.sh": script("mpi.sh") + mpi + args,
        "mpi.sh --via-deepspeed": script("mpi.sh") + mpi + ["--via-deepspeed"] + args,
        "hostfile.sh": script("hostfile.sh") + ["--hostfile", str(hostfile), "--master-addr", "127.0.0.1",
                                                "--master-port", port, "--no-ssh-check"] + args,
        "deepspeed": [str(Path(launch_env()["PATH"].split(os.pathsep)[0]) / "deepspeed"), "--num_gpus", "2",
                      "--master_port", port, "--no_local_rank", "--module", "sparsemixer_ds.cli", "train",
                      "--config", str(REPO / "configs" / "cpu_small.yaml")] + args[1:],
    }


# DeepSpeed's pdsh runner stops a job with `pkill -f "<python> -u -m deepspeed.launcher.launch"` on every host: on
# this one machine that ends every other launched job too, so the hostfile.sh case runs alone (make test: -m alone).
@pytest.mark.parametrize("path", ["local.sh", "node.sh", "mpi.sh", "mpi.sh --via-deepspeed",
                                  pytest.param("hostfile.sh", marks=pytest.mark.alone), "deepspeed"])
def test_sigterm_to_any_launch_saves_a_checkpoint_and_ends_every_rank(tmp_path, corpus, path, request):
    env = launch_env()
    if path == "hostfile.sh":
        env["PDSH_SSH_ARGS_APPEND"] = request.getfixturevalue("sshd")
    run_dir = tmp_path / "run"
    job = start(stop_paths(tmp_path, corpus, None)[path], env)
    try:
        wait_for_steps(job, run_dir)
        os.kill(job.pid, signal.SIGTERM)
        signalled = time.time()
        out = job.communicate(timeout=60)[0]
        while rank_pids(str(run_dir)) and time.time() - signalled < 40:
            time.sleep(0.2)
        ended = time.time() - signalled
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert rank_pids(str(run_dir)) == {}, "no rank outlives its launcher"
    assert ended < 25 + 10, f"the job ended {ended:.1f} s after SIGTERM (train.stop_grace_s=25)"
    if path == "deepspeed":
        assert job.returncode == -signal.SIGTERM, "DeepSpeed's runner itself dies of the signal; its ranks stop"
    elif path in ("local.sh", "node.sh"):
        assert job.returncode == 128 + signal.SIGTERM, out[-4000:]
    else:
        assert job.returncode != 0, out[-4000:]  # MPI and pdsh report a failed rank in their own ways
    stopped = run_metrics(run_dir)[-1]
    assert set(stopped) == {"step", "stopped"}, stopped
    tag = run_dir / "checkpoints" / f"step_{stopped['step']:08d}"
    assert (tag / "COMPLETE").is_file(), "a complete checkpoint of the step the ranks stopped at"
    if path not in ("deepspeed", "hostfile.sh"):  # their runner exits at once, and pdsh's output with it
        assert f"stopped: at step {stopped['step']} on request" in out and "plus --resume" in out, out[-3000:]


def test_a_preempted_run_resumes_to_the_uninterrupted_result(tmp_path, corpus):
    steps = ["train.steps=30", "checkpoint.interval=0", "eval.interval=10", "logging.plot=false"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    local = script("local.sh") + ["--nproc", "2", "--master-port"]
    proc = run(local + [str(free_port()), "--", *set_args(f"run_dir={full}", f"data.path={corpus}", *steps)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = start(local + [str(free_port()), "--", *set_args(f"run_dir={cut}", f"data.path={corpus}", *steps)])
    try:
        wait_for_steps(job, cut)
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 128 + signal.SIGTERM, job.stdout.read()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    at = run_metrics(cut)[-1]["step"]
    assert at < 30, "stopped before the end"
    proc = run(local + [str(free_port()), "--", *set_args(f"run_dir={cut}", f"data.path={corpus}", *steps),
                        "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    def records(run_dir, kind):
        return {m["step"]: m for m in run_metrics(run_dir) if kind in m and not m.get("resumed")}

    for kind, keys in (("loss", ("loss", "balance_loss", "lr")), ("val_loss", ("val_loss",))):
        want, got = records(full, kind), records(cut, kind)
        assert [step for step in got if step > at] == [step for step in want if step > at]
        for step in (step for step in want if step > at):
            for key in keys:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
