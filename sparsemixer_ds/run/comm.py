"""Starting DeepSpeed's process group, under any launcher, without leaving anything behind on the machine."""
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from torch.distributed import distributed_c10d

from ..config import ConfigError, RunError

SHM_DIR = Path("/dev/shm")


def discover_mpi() -> None:
    """Under mpirun, take rank, world size and local rank from mpi4py.

    DeepSpeed's own MPI discovery would do the same but points MASTER_ADDR at the first address of
    ``hostname -I``, which is wrong on multi-homed hosts; here MASTER_ADDR and MASTER_PORT come from
    the environment (launch/mpi.sh sets them), else rank 0's host name and 29500.
    """
    under_mpi = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if "RANK" in os.environ or not under_mpi:
        return
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = comm.bcast(os.environ.get("MASTER_ADDR") or socket.gethostname(), root=0)
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()), LOCAL_RANK=str(node.Get_rank()),
                      LOCAL_SIZE=str(node.Get_size()), MASTER_ADDR=master,
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def is_this_host(addr: str) -> bool:
    """Whether ``addr`` (a host name or an IP address) names this machine: a socket can bind to it."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def port_unavailable(port: int) -> Optional[str]:
    """Why a rendezvous could not listen on ``port`` of this machine (the OS's reason, such as
    "Address already in use"), or None if it can. Probed as torch's TCPStore listens: on every
    interface, with SO_REUSEADDR, so a port that a finished job left in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            return err.strerror
    return None


def check_master_port(addr: str, port: int) -> None:
    """Refuse a rendezvous port that rank 0, on this machine, could not listen on."""
    reason = port_unavailable(port)
    if reason is not None:
        raise ConfigError(f"master port {port} on {addr} cannot be used for the rendezvous ({reason}): another job "
                          "or program holds it; pass a free port with --master-port to the launch script (MASTER_PORT "
                          "when starting ranks by hand)")


def init_distributed(timeout_s: float = 1800.0, verbose: bool = True) -> None:
    """``deepspeed.init_distributed`` on the accelerator's backend, with a collective timeout:
    a collective (and the rendezvous) that waits longer than ``timeout_s`` for a rank fails.

    Rank 0 listens on MASTER_PORT for the rendezvous, so it first checks that the port is free: taken
    (by another job, say), the other ranks would join whatever listens there.
    """
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    backend = get_accelerator().communication_backend_name()
    first = not torch.distributed.is_initialized()
    # torchrun's agent listens on MASTER_PORT itself and hands its store to the ranks.
    if first and os.environ.get("RANK", "0") == "0" and port.isdigit() and \
            "TORCHELASTIC_USE_AGENT_STORE" not in os.environ:
        check_master_port(addr, int(port))
    # DeepSpeed's CPU backend gives each rank a shared-memory segment when all ranks are on this
    # machine, right after the rendezvous, and then waits for every other rank's. A rank that joined
    # another job's rendezvous would wait there until killed and leave its segment behind; a barrier
    # first proves the group is this job's, and such a rank is killed in it, before any segment exists.
    segments = first and backend == "gloo" and os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE", "")
    start = time.monotonic()
    try:
        if segments:
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            torch.distributed.barrier()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=verbose)
    except RuntimeError as err:  # torch.distributed's DistError and kin: a rank never came
        raise RunError(f"the ranks did not form one process group at {addr}:{port} after "
                       f"{time.monotonic() - start:.0f} s ({err}); start every node's ranks "
                       f"(train.collective_timeout_s={timeout_s:g} bounds the wait) and check that MASTER_ADDR:"
                       "MASTER_PORT (--master-addr and --master-port of the launch scripts) is rank 0's host and a "
                       "free port there, reachable from every node") from err
    release_shm_segment()
    set_collective_timeout(timeout_s)


def single_process_group() -> None:
    """A world of one for DeepSpeed's engine in this process, when no launcher set one up (an export, a test)."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    init_distributed(verbose=False)


def set_collective_timeout(seconds: float) -> None:
    """Make every collective of this process wait at most ``seconds`` for the other ranks: in the
    process groups that exist and in those made from now on.

    torch gives a group made by ``new_group(ranks)`` without a timeout its own default (30 minutes),
    not the world group's, and DeepSpeed makes its expert-parallel, expert-data-parallel and
    data-parallel groups that way: a rank waiting for a stopped one in a MoE all-to-all or in the
    gradient all-reduce waited 30 minutes, whatever train.collective_timeout_s said.
    """
    timeout = timedelta(seconds=seconds)
    # What new_group() without a timeout takes (torch keeps one default for NCCL, one for the other backends).
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timeout, group)


def exit_rank(code: int = 0) -> None:
    """End this rank's process with ``code``, its output flushed, without the interpreter's finalization.

    Finalization can abort in the C++ destructors of gloo's connections to ranks that have exited
    already (SIGABRT, "terminate called without an active exception"), replacing the exit code: the
    launcher then reports a job that finished its work as failed. Under mpirun (discover_mpi) MPI is
    finalized first, since mpirun counts a rank that never finalized as failed. Call it last, after
    everything the rank writes has been written.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def shm_segment(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU backend creates for ``rank`` of this job."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    On the CPU accelerator, with every rank on one machine, DeepSpeed gives each rank a 66 MB
    segment in /dev/shm for its low-latency all-reduce and never unlinks it: every job would leave
    its segments behind, in RAM, until the machine reboots. Each rank maps all the others' before
    ``init_distributed`` returns, so after a barrier the names can go; the memory itself is freed
    when the last process mapping it exits.
    """
    dist.barrier()
    shm_segment(dist.get_rank()).unlink(missing_ok=True)
