"""A rank that stops answering, or hangs outside the collectives the others wait in, ends the job
with one line that names it.

Why the collectives' own timeout is not enough: it fails the rank that waited, with gloo's "Timed out
waiting 30000ms for recv", and names neither the rank it waited for nor whether that one is stopped
or alive and stuck in its own code; a rank that never calls a collective again is not seen at all.

How. ``Watchdog.start(timeout_s)`` right after the process group exists; every rank then runs two
daemon threads, each waking every ``beat_s(T)`` seconds (T/30, kept within 0.5-5 s):

- the *beat* thread looks where this rank's main thread is (its innermost Python frame, and whether
  that frame is inside ``torch.distributed``: waiting in a collective) and publishes a heartbeat to
  the job's c10d store, through a store client of its own: a counter, host, pid, the step and phase
  the training loop last marked, where the main thread is, how long it has waited in the same
  collective call (no process group's sequence number moved meanwhile) and how long the step and
  phase have not changed. It then reads the heartbeats this rank judges: rank 0 reads every rank's,
  the others read rank 0's.
- the *judge* thread applies the rules below to what the beat thread last read. It never calls the
  store itself: when the store's host (rank 0) is stopped, TCPStore's ``check`` and ``get`` block for
  good, so "the store has not answered for T" is itself a finding.

The training loop only calls ``mark(step, phase)``, one assignment in memory (about 0.1 us): the
checking costs the steps nothing; the threads hold the GIL some 15 us per beat for the heartbeat,
and release it during store calls.

The rules (T = train.collective_timeout_s; durations are measured on the judging rank's own
monotonic clock or on the rank they describe, never by comparing clocks across hosts):

1. **Stopped** (not answering at all): a rank whose heartbeat has not moved for T. A SIGSTOPped
   process, a frozen node, a process stuck in the kernel or in C code that holds the GIL: its beat
   thread stops with it. Rank 0 judges every rank; every other rank judges rank 0, whose process
   also serves the store, so rank 0's store not answering for T counts the same.
2. **Hanging** (alive, not progressing): some rank has waited in one collective call for T. The
   ranks meanwhile outside any collective are those it waits for: alive, but not arriving. If every
   rank is inside a collective, none of which completes (mismatched collectives), the verdict lists
   them all. Rank 0 judges this for every rank, itself included.

Slow phases are not stalls. During a long checkpoint save, an evaluation or a first step that
compiles, the heartbeat goes on, so rule 1 never fires; rule 2 fires only once another rank has
waited T in one collective for the slow one, which the collective's own timeout would have ended
as well (hence: T longer than the slowest checkpoint save).

Rule 2 sees a wait where the main thread blocks inside torch.distributed, as it does for gloo (CPU).
With NCCL a collective returns at once and the wait shows up at a later CUDA synchronisation, in the
rank's own code: there rule 1 holds, and NCCL's own watchdog ends a collective at the backstop below.

A verdict: the judging rank writes one line to stderr and exits with ``os._exit(1)`` (the main
thread is blocked in a collective and cannot unwind); the launcher then ends the job (deepspeed's
launcher, ``srun --kill-on-bad-exit``, ``mpirun``). It comes at most ``margin_s(T)`` (4 beats + 1 s)
after T: after the stop for rule 1, after the wait began for rule 2. The process groups' own
collective timeout is set to ``backstop_s(T)`` (T + 2 margins), so that it fires only for waits
these rules cannot see (a collective issued asynchronously and waited on outside torch.distributed),
after the watchdog has had its say.
"""
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch.distributed as torch_dist
from torch.distributed import distributed_c10d

from .comm import set_collective_timeout

__all__ = ["Watchdog", "Seen", "verdict", "beat_s", "margin_s", "backstop_s"]

KEY = "sparsemixer_ds/heartbeat/{}"
TORCH_DISTRIBUTED = str(Path(torch_dist.__file__).parent) + os.sep
PACKAGE = str(Path(__file__).parent) + os.sep


def beat_s(timeout_s: float) -> float:
    """Seconds between two heartbeats (and two judgements) for a collective timeout of ``timeout_s``."""
    return min(5.0, max(0.5, timeout_s / 30))


def margin_s(timeout_s: float) -> float:
    """How long after ``timeout_s`` a verdict comes at most: the stopped rank's last beat may be one
    beat old when it stops, the judge reads it up to a beat later and judges up to a beat after the
    timeout (a waiting rank notices its own wait up to a beat late), plus a second for slow store calls."""
    return 4 * beat_s(timeout_s) + 1.0


def backstop_s(timeout_s: float) -> float:
    """The process groups' own collective timeout while a watchdog runs: after any verdict it could give."""
    return timeout_s + 2 * margin_s(timeout_s)


class Seen(NamedTuple):
    """What a judge knows of one rank: its last heartbeat (None before the first) and when, on the
    judge's clock, its counter last moved (or the watchdog started)."""
    heartbeat: Optional[dict]
    alive_at: float


def _who(rank: int, heartbeat: Optional[dict]) -> str:
    if heartbeat is None:
        return f"rank {rank}"
    return f"rank {rank} (host {heartbeat['host']}, pid {heartbeat['pid']})"


def _at(heartbeat: Optional[dict]) -> str:
    if heartbeat is None:
        return "no heartbeat since the job started"
    return f"no heartbeat since step {heartbeat['step']}, in '{heartbeat['phase']}'"


def verdict(now: float, timeout_s: float, seen: Dict[int, Seen], store_ok_at: Optional[float] = None,
            store: str = "", hangs: bool = False) -> Optional[str]:
    """The rules of the module docstring applied to what one judge has seen; a message naming the rank
    that stalled and how, or None while every rank answers and no collective has waited ``timeout_s``.

    ``seen``: the ranks this judge watches for heartbeats (rank 0: every other rank; the others:
    rank 0), plus, on rank 0, its own latest heartbeat (``alive_at`` = ``now``) for rule 2.
    ``store_ok_at``: when the store last answered (only ranks other than 0 pass it); ``store``: its address.
    ``hangs``: apply rule 2 (``seen`` holds every rank: rank 0's view).
    """
    if store_ok_at is not None:
        # Rank 0 is silent since its heartbeat or the store last answered, whichever was earlier (a read
        # of the heartbeat is a store answer, so in practice the heartbeat). The store is blamed when it
        # is the reason: its calls take milliseconds each beat, so two beats and a second without an
        # answer mean a call is stuck.
        heartbeat, alive_at = seen.get(0, Seen(None, store_ok_at))
        silent = now - min(alive_at, store_ok_at)
        if silent > timeout_s and now - store_ok_at > 2 * beat_s(timeout_s) + 1.0:
            last = "" if heartbeat is None else f"; last heartbeat at step {heartbeat['step']}, in '{heartbeat['phase']}'"
            return (f"{_who(0, heartbeat)} has not answered for {silent:.0f} s (stopped or dead: its store "
                    f"at {store} does not answer{last})")
    for rank, (heartbeat, alive_at) in sorted(seen.items()):
        if now - alive_at > timeout_s:
            return (f"{_who(rank, heartbeat)} has not answered for {now - alive_at:.0f} s (stopped or dead: "
                    f"{_at(heartbeat)})")
    if not hangs:
        return None
    beats = {rank: s.heartbeat for rank, s in seen.items() if s.heartbeat is not None}
    waiting = sorted(rank for rank, hb in beats.items() if hb["collective"] and hb["waiting_s"] >= timeout_s)
    if not waiting:
        return None
    waits = ", ".join(f"rank {r} {beats[r]['waiting_s']:.0f} s in {beats[r]['collective']}" for r in waiting)
    absent = sorted(rank for rank, hb in beats.items() if not hb["collective"])
    if absent:
        hanging = "; ".join(f"{_who(r, beats[r])} is hanging: alive, but outside any collective and at step "
                            f"{beats[r]['step']}, '{beats[r]['phase']}', for {beats[r]['still_s']:.0f} s (at "
                            f"{beats[r]['where']})" for r in absent)
        return f"{hanging}, while other ranks wait in collectives ({waits})"
    every = "; ".join(f"{_who(r, hb)} in {hb['collective']} for {hb['waiting_s']:.0f} s at step {hb['step']}, "
                      f"'{hb['phase']}'" for r, hb in sorted(beats.items()))
    return f"every rank is hanging in a collective that does not complete (mismatched collectives?): {every}"


def _sequence_numbers() -> Optional[int]:
    """The sum of the sequence numbers of this rank's process groups: it moves with every collective
    issued. None where a backend does not count them (then rule 2 cannot tell one wait from the next)."""
    try:
        return sum(group._get_sequence_number_for_group() for group in list(distributed_c10d._world.pg_map))
    except (RuntimeError, NotImplementedError):
        return None


def _frame_name(frame) -> str:
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} in {frame.f_code.co_name}"


class Watchdog:
    """This rank's heartbeat and, for the ranks it judges, the rules of the module docstring.

    ``mark(step, phase)`` is all the training loop calls; ``stop()`` when the run ends. With one rank
    there is nobody to watch or to wait for: no threads start and both are no-ops.
    """

    def __init__(self, timeout_s: float, rank: int, world: int, host: Optional[str] = None) -> None:
        self.timeout_s, self.rank, self.world = float(timeout_s), rank, world
        self.beat = beat_s(timeout_s)
        self.host, self.pid = host or socket.gethostname(), os.getpid()
        self.store_address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        self.position: Tuple[int, str] = (0, "start-up")  # (step, phase), set by the main thread only
        self._store = None  # the job's store: set by start()
        self._main = threading.main_thread().ident
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watched = list(range(1, world)) if rank == 0 else [0]
        start = time.monotonic()
        self._seen: Dict[int, Seen] = {r: Seen(None, start) for r in self._watched}
        self._store_ok_at = start
        self._own: Optional[dict] = None
        self._count = 0
        self._wait: Optional[Tuple[str, int]] = None  # (collective, sequence number) of the current wait
        self._wait_since = self._position_since = start
        self._last_position = self.position

    @classmethod
    def start(cls, timeout_s: float) -> "Watchdog":
        """Watch this job's ranks (the process group must exist): collectives' own timeout becomes the
        backstop, and the threads start."""
        watchdog = cls(timeout_s, torch_dist.get_rank(), torch_dist.get_world_size())
        if watchdog.world > 1:
            _sequence_numbers()  # torch's private API, used from the thread later: fails here if it changed
            set_collective_timeout(backstop_s(timeout_s))
            watchdog._store = distributed_c10d._get_default_store().clone()
            watchdog._threads()
        return watchdog

    def _threads(self) -> None:
        threading.Thread(target=self._beat_loop, name="watchdog-beat", daemon=True).start()
        threading.Thread(target=self._judge_loop, name="watchdog-judge", daemon=True).start()

    def mark(self, step: int, phase: str) -> None:
        """Where the training loop is: shown in the verdicts, never judged by itself."""
        self.position = (step, phase)

    def stop(self) -> None:
        """The run ended: no more judging (the threads end at their next beat)."""
        self._stopping.set()

    def heartbeat(self, now: float) -> dict:
        """This rank's heartbeat now: called by the beat thread only (it keeps the wait's state)."""
        position = self.position
        if position != self._last_position:
            self._last_position, self._position_since = position, now
        frame = sys._current_frames().get(self._main)
        collective, where, ours = "", "?", None
        if frame is not None:
            where = _frame_name(frame)
            if frame.f_code.co_filename.startswith(TORCH_DISTRIBUTED):
                collective = frame.f_code.co_name
            outer = frame
            while outer is not None and ours is None:
                if outer.f_code.co_filename.startswith(PACKAGE):
                    ours = _frame_name(outer)
                outer = outer.f_back
            del frame, outer
        if ours and ours != where:
            where = f"{where}, from {ours}"
        sequence = _sequence_numbers() if collective else None
        wait = (collective, sequence) if collective and sequence is not None else None
        if wait != self._wait:
            self._wait, self._wait_since = wait, now
        self._count += 1
        return {"beat": self._count, "host": self.host, "pid": self.pid, "step": position[0], "phase": position[1],
                "where": where, "collective": collective, "waiting_s": now - self._wait_since if wait else 0.0,
                "still_s": now - self._position_since}

    def _beat_loop(self) -> None:
        client = self._store
        keys = [KEY.format(r) for r in self._watched]
        while not self._stopping.is_set():
            own = self.heartbeat(time.monotonic())
            with self._lock:
                self._own = own
            try:
                if client is None:
                    client = self._store.clone()
                client.set(KEY.format(self.rank), json.dumps(own))
                if client.check(keys):
                    values = client.multi_get(keys)
                else:  # at the start: not every rank has published yet, and get() would wait for it
                    values = [client.get(key) if client.check([key]) else None for key in keys]
                self._saw(values, time.monotonic())
            except (RuntimeError, OSError):  # torch's DistError and kin: a timeout, a lost connection
                client = None  # a late answer would be taken for the next call's: start a fresh client
            self._stopping.wait(self.beat)

    def _saw(self, values: List[Optional[bytes]], now: float) -> None:
        with self._lock:
            self._store_ok_at = now
            for rank, value in zip(self._watched, values):
                if value is None:
                    continue
                heartbeat = json.loads(value)
                before = self._seen[rank]
                moved = before.heartbeat is None or heartbeat["beat"] != before.heartbeat["beat"]
                self._seen[rank] = Seen(heartbeat, now if moved else before.alive_at)

    def judge(self, now: float, last: float) -> Optional[str]:
        """The verdict on what the beat thread has read, at ``now``; ``last``: the judgement before."""
        with self._lock:
            if now - last > 3 * self.beat + 1:
                # This process itself did not run (stopped, or starved of CPU): what it saw is old,
                # not the others' silence. Count from now.
                self._seen = {r: Seen(s.heartbeat, now) for r, s in self._seen.items()}
                self._store_ok_at = now
            seen = dict(self._seen)
            if self.rank == 0 and self._own is not None:
                seen[0] = Seen(self._own, now)
            store_ok_at = None if self.rank == 0 else self._store_ok_at
        return verdict(now, self.timeout_s, seen, store_ok_at, self.store_address, hangs=self.rank == 0)

    def _judge_loop(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(self.beat):
            now = time.monotonic()
            message = self.judge(now, last)
            last = now
            if message and not self._stopping.is_set():
                self._exit(f"{message}; ending the job (train.collective_timeout_s={self.timeout_s:g})")
                return

    @staticmethod
    def _exit(message: str) -> None:
        try:
            sys.stderr.write(f"sparsemixer-ds train: stopped: {message}\n")  # one write: ranks share the stream
            sys.stderr.flush()
        except OSError:
            pass  # the launcher's end of the pipe may be gone
        os._exit(1)
