"""One run per run directory: ``run_dir/LOCK`` names the host and process that train in it.

Two trainings writing one directory would interleave their metrics, overwrite each other's
checkpoints and configs, and both report success. So a launch takes the lock before any rank starts
(``sparsemixer-ds check --lock``, run by every launch script; the script's process holds it), its
rank 0 takes it over when training starts (the same launch: the same ``SPARSEMIXER_RUN_TOKEN``),
and releases it when the run ends. Anyone else finds it held and is refused, with the holder named.

A lock whose holder is gone is taken over with a warning: on the same host when the holder's
process no longer exists (or the machine has rebooted since); from another host when the holder
has not refreshed it for STALE_AFTER_S (a running rank 0 refreshes it every REFRESH_S).
"""
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .stop import process_start_time

__all__ = ["RunLock", "check_lock", "launch_token", "TOKEN_ENV"]

LOCK_NAME = "LOCK"
TOKEN_ENV = "SPARSEMIXER_RUN_TOKEN"  # the same for every process of one launch
REFRESH_S = 30.0
STALE_AFTER_S = 300.0


def launch_token() -> str:
    """This launch's token: the launch script's, else (a bare launcher) the rendezvous every rank shares."""
    return os.environ.get(TOKEN_ENV) or f"rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _read(path: Path) -> Optional[dict]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (a write cut short): nobody's lock


def _gone(holder: dict, path: Path) -> Optional[str]:
    """Why the holder of a lock is gone, or None if it may still be running."""
    if not holder.get("host") or not holder.get("pid"):
        return "the lock file is unreadable"
    if holder["host"] != socket.gethostname():
        try:
            quiet = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "the lock was released"
        return f"not refreshed for {quiet:.0f} s" if quiet > STALE_AFTER_S else None
    if holder.get("boot_id") and holder["boot_id"] != _boot_id():
        return "the machine has rebooted since"
    started = process_start_time(holder["pid"])
    if started is None or started != holder.get("start_time", started):  # none, or another one by that pid
        return f"process {holder['pid']} no longer exists"
    return None


def _describe(holder: dict, path: Path) -> str:
    age = time.time() - path.stat().st_mtime if path.exists() else 0.0
    return (f"host {holder.get('host')}, pid {holder.get('pid')} ({holder.get('role', '?')}, since "
            f"{holder.get('since', '?')}, lock refreshed {age:.0f} s ago)")


def check_lock(run_dir, token: str) -> Optional[str]:
    """Refuse (ConfigError) a run directory that another live launch holds; return a warning when
    a gone holder's lock would be taken over, else None. Writes nothing."""
    path = Path(run_dir) / LOCK_NAME
    holder = _read(path)
    if holder is None or holder.get("token") == token:
        return None
    gone = _gone(holder, path)
    if gone is None:
        raise ConfigError(f"run_dir {run_dir} is in use by another run: {_describe(holder, path)}. Wait for it to "
                          f"end or stop it, or choose another run_dir; if that run is dead, remove {path}")
    return f"WARNING: taking over {path} from a run that is gone ({_describe(holder, path)}: {gone})"


class RunLock:
    """The lock of ``run_dir`` held by this process for the launch ``token``."""

    def __init__(self, run_dir, token: str, role: str, pid: Optional[int] = None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.token, self.role, self.pid = token, role, pid or os.getpid()
        self._done = threading.Event()

    def acquire(self) -> "RunLock":
        """Take the lock: new, ours already (the same launch), or left by a run that is gone (with a
        warning on stderr). A ConfigError if a live run holds it."""
        warning = check_lock(self.path.parent, self.token)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": self.pid, "start_time": process_start_time(self.pid),
                  "boot_id": _boot_id(), "token": self.token, "role": self.role,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{self.pid}.tmp")
        tmp.write_text(json.dumps(record))
        if self.path.exists():
            tmp.replace(self.path)  # ours or a gone run's: replaced
        else:
            try:
                os.link(tmp, self.path)  # atomic and exclusive: of two launches at once, one wins
            except FileExistsError:
                tmp.unlink()
                return self.acquire()  # the other won: refused now, or ours after all
            tmp.unlink()
        return self

    def keep_fresh(self) -> None:
        """Refresh the lock every REFRESH_S until released (a holder on another host is judged by it)."""
        def refresh():
            while not self._done.wait(REFRESH_S):
                if self.held():
                    os.utime(self.path)
        threading.Thread(target=refresh, name="run-lock", daemon=True).start()

    def held(self) -> bool:
        holder = _read(self.path)
        return bool(holder) and holder.get("token") == self.token and holder.get("pid") == self.pid

    def release(self) -> None:
        self._done.set()
        if self.held():
            self.path.unlink()
