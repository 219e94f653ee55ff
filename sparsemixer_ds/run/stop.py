"""Stopping a run on request: preemption (SIGTERM), Ctrl-C (SIGINT), a lost terminal (SIGHUP), or
a launcher that went away.

Schedulers stop a job with SIGTERM and follow with SIGKILL after a grace period (SLURM's KillWait
and Kubernetes' terminationGracePeriodSeconds are both 30 s by default). On a request every rank
finishes the step it is in; the ranks then agree on that step (a signal reaches them at different
moments, so each step ends with a one-number all-reduce of "is a stop asked for"), save a complete
checkpoint and exit with 128 + the signal's number. A deadline bounds all of it: ``grace_s`` after
the first request the process exits whether or not the checkpoint is complete (an incomplete one is
never taken for a checkpoint). A second SIGINT exits at once.

A launcher that dies without passing the signal on (``kill`` of the ``deepspeed`` runner, a SIGKILL
of DeepSpeed's per-node launch.py or of mpirun) would leave its ranks training on, re-parented to
PID 1; each rank therefore watches the launcher processes above it and treats their end as SIGTERM.
"""
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from deepspeed import comm as dist

from ..config import RunError

__all__ = ["StopRequest", "Stopped", "launcher_chain", "process_start_time"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCH_INTERVAL_S = 1.0
# Command names of processes that start ranks: DeepSpeed's runner and per-node launcher, MPI, SLURM,
# and this project's launch scripts.
LAUNCHERS = ("deepspeed", "mpirun", "mpiexec", "orterun", "prterun", "orted", "prted", "srun")


class Stopped(RunError):
    """The run stopped on request, and rank 0 has said so; ``exit_code`` is the signal's 128 + number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stat(pid: int) -> List[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, ...); OSError if no such process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces


def process_start_time(pid: int) -> Optional[int]:
    """A live process's start time (clock ticks since boot), or None if there is none by that pid: with
    the pid, it tells a process from a later one that reuses its pid."""
    try:
        fields = _stat(pid)
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited


def _process(pid: int) -> Optional[Tuple[int, List[str]]]:
    """(start time, argv) of a live process, or None if there is none by that pid."""
    start = process_start_time(pid)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return None if start is None else (start, argv)


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _is_launcher(argv: List[str]) -> bool:
    names = [Path(arg).name for arg in argv[:2] if arg]
    if argv and argv[0].startswith("slurmstepd"):
        return True
    if any(name in LAUNCHERS for name in names):
        return True
    if "deepspeed.launcher.launch" in argv or "deepspeed.launcher.runner" in argv:
        return True
    # bash launch/local.sh ...: this project's launch scripts
    return len(argv) > 1 and Path(argv[1]).parent.name == "launch" and argv[1].endswith((".sh", ".sbatch"))


def launcher_chain(pid: Optional[int] = None) -> List[Tuple[int, int, str]]:
    """The launcher processes above ``pid`` (default: this process), nearest first, as (pid, start
    time, command): the parent and each further ancestor while it is a launcher."""
    chain = []
    try:
        current = _parent(pid or os.getpid())
        while current > 1:
            found = _process(current)
            if found is None or not _is_launcher(found[1]):
                break
            chain.append((current, found[0], " ".join(found[1][:2])))
            current = _parent(current)
    except OSError:
        pass  # no /proc: nothing to watch
    return chain


class StopRequest:
    """The stop requests of this rank: signal handlers, the launcher watch and the deadline.

    ``reason`` is None until a request; ``agreed()`` is called by every rank after every step and
    returns the reason on every rank once any rank has one.
    """

    def __init__(self, grace_s: float, rank: int) -> None:
        self.grace_s, self.rank = grace_s, rank
        self.reason: Optional[str] = None
        self.signum = signal.SIGTERM
        self.deadline_note = ""  # what the deadline message adds: the newest complete checkpoint
        self._lock = threading.Lock()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        self._watched = launcher_chain()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def request(self, reason: str, signum: int) -> None:
        """Ask for a stop: the first request starts the deadline, later ones change nothing."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.signum = reason, signum
        threading.Thread(target=self._deadline, name="stop-deadline", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            self._exit("a second SIGINT: exiting now, without a checkpoint", signum)
        self.request(signal.Signals(signum).name, signum)

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S):
            for pid, start, command in self._watched:
                found = _process(pid)
                if found is None or found[0] != start:
                    self.request(f"its launcher ({command}, pid {pid}) is gone", signal.SIGTERM)
                    return

    def _deadline(self) -> None:
        if not self._done.wait(self.grace_s):
            self._exit(f"the stop ({self.reason}) did not finish within train.stop_grace_s={self.grace_s:g} s; "
                       f"exiting without a new checkpoint{self.deadline_note}", self.signum)

    def _exit(self, message: str, signum: int) -> None:
        try:
            sys.stderr.write(f"sparsemixer-ds train: rank {self.rank}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass  # the launcher's end of the pipe may be gone
        os._exit(128 + signum)

    def agreed(self, device: torch.device) -> Optional[str]:
        """The stop reason once any rank has one (a collective: every rank calls it at the same step)."""
        asked = torch.tensor([0.0 if self.reason is None else float(self.signum)], device=device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        if asked.item() == 0.0:
            return None
        if self.reason is None:
            self.request("another rank's request", int(asked.item()))
        return self.reason

    def close(self) -> None:
        """The run ended (or was stopped and saved): no more deadline, the old handlers back."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
