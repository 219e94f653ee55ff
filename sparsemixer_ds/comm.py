"""Starting DeepSpeed's process group, under any launcher, without leaving anything behind on the machine."""
import os
import socket
from datetime import timedelta
from pathlib import Path

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from .config import RunError

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


def init_distributed(timeout_s: float = 1800.0, verbose: bool = True) -> None:
    """``deepspeed.init_distributed`` on the accelerator's backend, with a collective timeout:
    a collective (and the rendezvous) that waits longer than ``timeout_s`` for a rank fails."""
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=timedelta(seconds=timeout_s), verbose=verbose)
    except RuntimeError as err:  # torch.distributed's DistError and kin: a rank never came
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RunError(f"the ranks did not form one process group at {where} within {timeout_s:g} s ({err}); "
                       "start every node's ranks (train.collective_timeout_s bounds the wait) and check that "
                       "MASTER_ADDR:MASTER_PORT is rank 0's host and reachable from every node") from err
    release_shm_segment()


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
