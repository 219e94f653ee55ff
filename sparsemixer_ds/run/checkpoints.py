"""A run's checkpoints (``run_dir/checkpoints``): saving them, verifying them, choosing one, restoring it.

    step_NNNNNNNN/            DeepSpeed's files of one step, and COMPLETE once every rank saved its part
    step_NNNNNNNN.set-aside   a newer tag moved aside by a run that resumed an older one

A checkpoint tag without its COMPLETE marker (a save that was interrupted) is never taken for a
checkpoint: not by --resume, not by export. The marker records the size and SHA-256 of every file of
the tag, so a file truncated, zeroed, altered or deleted since is found before anything loads it
(``verify``); --resume then takes the newest intact tag, --resume-tag refuses. Markers written before
they held checksums (only step and tokens) are taken as "unverified".
"""
import json
import pickle
import shutil
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from deepspeed import comm as dist
from deepspeed.runtime.zero.utils import ZeRORuntimeException

from ..config import ConfigError, RunError
from .checksums import ALGORITHM, file_digests

__all__ = ["CheckpointStore", "TagState", "tag_name", "tag_step", "COMPLETE"]

TAG_PREFIX = "step_"
COMPLETE = "COMPLETE"  # written into a tag's directory once every rank has saved its part

INTACT, CORRUPT, INCOMPLETE, UNVERIFIED = "intact", "corrupt", "incomplete", "unverified"


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


class TagState(NamedTuple):
    """A checkpoint tag and what its files say: intact (every file as its marker recorded it), corrupt
    (``detail`` names what differs), incomplete (no marker: a save that never finished) or unverified
    (a marker from before markers held checksums)."""
    tag: str
    state: str
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.state in (INTACT, UNVERIFIED)

    def describe(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


class CheckpointStore:
    """The checkpoint tags under ``path``; nothing is created until a save."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.verified: Dict[str, TagState] = {}  # what verify() found, by tag

    def tag_dirs(self) -> List[str]:
        """Every checkpoint tag's directory name, marked complete or not, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted((p.name for p in self.path.iterdir() if p.is_dir() and tag_step(p.name) is not None),
                      key=tag_step)

    def tags(self) -> List[str]:
        """Complete checkpoint tags (marked; whether their files are intact is verify's to say), oldest first."""
        return [tag for tag in self.tag_dirs() if (self.path / tag / COMPLETE).is_file()]

    def verify(self, tag: str) -> TagState:
        """Check a tag's files against its marker: each there, with the size and SHA-256 it was saved with.
        Remembered in ``verified``. With a process group, every rank must verify the same tags in turn
        (they share the hashing)."""
        if tag not in self.verified:
            self.verified[tag] = self._verify(tag)
        return self.verified[tag]

    def _verify(self, tag: str) -> TagState:
        root = self.path / tag
        try:
            record = json.loads((root / COMPLETE).read_text())
        except FileNotFoundError:
            return TagState(tag, INCOMPLETE, f"no {COMPLETE} marker (a save that never finished)")
        except (OSError, ValueError) as err:
            return TagState(tag, CORRUPT, f"its marker {root / COMPLETE} cannot be read ({err})")
        if not isinstance(record, dict) or "files" not in record:
            return TagState(tag, UNVERIFIED, "its marker was written before markers held checksums")
        try:
            want = {name: (int(entry["size"]), str(entry[ALGORITHM])) for name, entry in record["files"].items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            return TagState(tag, CORRUPT, f"its marker {root / COMPLETE} does not list sizes and {ALGORITHM} digests")
        found = file_digests(root, sorted(want, key=lambda name: -want[name][0]))
        problems = []
        for name, (size, digest) in sorted(want.items()):
            got = found[name]
            if got is None:
                problems.append(f"{root / name} is {'unreadable' if (root / name).exists() else 'missing'}")
            elif got.size != size:
                problems.append(f"{root / name} has {got.size:,} bytes, its marker recorded {size:,}")
            elif got.sha256 != digest:
                problems.append(f"{root / name} has {ALGORITHM} {got.sha256[:16]}..., its marker recorded "
                                f"{digest[:16]}...")
        if not problems:
            return TagState(tag, INTACT)
        more = f"; and {len(problems) - 3} more files differ" if len(problems) > 3 else ""
        return TagState(tag, CORRUPT, "; ".join(problems[:3]) + more)

    def states(self) -> List[TagState]:
        """Every checkpoint tag and its state, oldest first (verifying each not verified yet)."""
        return [self.verify(tag) for tag in self.tag_dirs()]

    def usable_tag(self, tag: Optional[str], option: str) -> str:
        """``tag`` after verifying it, or with None the newest tag that is intact (or unverified),
        verifying from the newest down; a ConfigError naming the problem when it is not usable or none is.
        ``option`` is the user's name for ``tag`` in the messages (--resume-tag, --tag)."""
        if tag is not None:
            if tag not in self.tag_dirs():
                raise ConfigError(f"{option} {tag}: {self.path} has no such checkpoint; it has "
                                  f"{', '.join(self.tag_dirs()) or 'none'}")
            state = self.verify(tag)
            if not state.usable:
                raise ConfigError(f"{option} {tag}: the checkpoint is {state.describe()}; choose another tag "
                                  "(sparsemixer-ds check --resume lists them and their state)")
            return tag
        for candidate in reversed(self.tag_dirs()):
            if self.verify(candidate).usable:
                return candidate
        raise ConfigError(f"{self.path} holds no intact checkpoint (" + "; ".join(
            f"{state.tag} {state.describe()}" for state in reversed(self.states())) + "); restore the files "
            "from a copy, or start the run again in a new run_dir")

    def resume_tag(self, resume: Union[bool, str]) -> str:
        """The tag a resume loads: ``resume`` when it names one (--resume-tag: that one or a ConfigError), else
        the newest intact one (--resume)."""
        return self.usable_tag(resume if isinstance(resume, str) else None, "--resume-tag")

    def notes(self, tag: str) -> List[str]:
        """What the user should hear about taking ``tag``: each newer tag passed over as damaged and why, and
        whether ``tag`` itself was verified; from what verify() found, hashing nothing more. (Interrupted
        saves, and newer tags a --resume-tag leaves, are reported where they are removed or set aside.)"""
        lines = []
        for newer in reversed(self.tag_dirs()[self.tag_dirs().index(tag) + 1:]):  # newest first
            state = self.verified.get(newer)
            if state is not None and state.state == CORRUPT:
                lines.append(f"WARNING: skipping checkpoint {newer}, {state.describe()}; taking {tag}, the newest "
                             "intact one")
        if self.verify(tag).state == UNVERIFIED:
            lines.append(f"note: {tag} is taken unverified: {self.verify(tag).detail}")
        return lines

    def listing(self, chosen: Optional[str]) -> str:
        """Every checkpoint tag with its state, ``chosen`` pointed out: what ``check --resume`` prints."""
        lines = [f"checkpoints in {self.path}:"]
        for state in self.states():
            arrow = "  <- resume" if state.tag == chosen else ""
            lines.append(f"  {state.tag}  {state.describe()}{arrow}")
        return "\n".join(lines)

    def choose(self, tag: Optional[str] = None) -> str:
        """A verified checkpoint's tag: ``tag`` itself, or the newest intact one when None (newer damaged ones
        passed over with a warning); a clear error if there is none."""
        tags = self.tags()
        if not tags:
            raise ConfigError(f"{self.path} holds no checkpoint; train first or point --run at a run directory")
        chosen = self.usable_tag(tag, "--tag")
        for line in self.notes(chosen):
            print(line, file=sys.stderr, flush=True)
        return chosen

    def save(self, engine, step: int, tokens: int, skipped: int, config: dict, keep: int, rank: int) -> None:
        """Save through DeepSpeed (experts per expert), with the run's ``config`` (a config_dict) beside the
        step, mark the tag complete once every rank's part is written (the marker records each file's size and
        SHA-256, the ranks sharing the hashing), then keep only the newest ``keep``. A save that fails (a full
        disk) raises a RunError on the rank it failed on; the tag stays unmarked, so no resume takes it."""
        # Not "skipped_steps": DeepSpeed's own state has one, and load_checkpoint removes it from the client's.
        client = {"step": step, "tokens": tokens, "steps_skipped": skipped, "config": config}
        tag = tag_name(step)
        marker = self.path / tag / COMPLETE
        if rank == 0:  # a tag saved again is incomplete until marked again; save_checkpoint begins with a barrier
            marker.unlink(missing_ok=True)
        try:
            engine.save_checkpoint(str(self.path), tag=tag, client_state=client)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            raise self._save_failed(tag, rank, err) from err
        dist.barrier()  # every rank's files are written
        # Rank 0's listing (on a shared file system it sees every rank's files), hashed by all ranks.
        names = [self._saved_files(tag) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        digests = file_digests(self.path / tag, names[0])
        if rank == 0:
            partial = marker.with_suffix(".tmp")
            try:
                unread = [name for name, digest in digests.items() if digest is None]
                if unread:
                    raise OSError(f"{', '.join(unread)} could not be read back")
                files = {name: {"size": d.size, ALGORITHM: d.sha256} for name, d in sorted(digests.items())}
                partial.write_text(json.dumps({"step": step, "tokens": tokens, "files": files}, indent=1))
            except OSError as err:
                raise self._save_failed(tag, rank, err) from err
            partial.replace(marker)  # atomic: the tag is complete or it is not
            for old in self.tags()[:-keep]:
                shutil.rmtree(self.path / old)
        dist.barrier()

    def _saved_files(self, tag: str) -> List[str]:
        """The files of a tag, relative to its directory, largest first (how file_digests shares them best)."""
        root = self.path / tag
        files = [p for p in root.rglob("*") if p.is_file() and p.name not in (COMPLETE, f"{COMPLETE}.tmp")]
        return [p.relative_to(root).as_posix() for p in sorted(files, key=lambda p: (-p.stat().st_size, p.name))]

    def _save_failed(self, tag: str, rank: int, err: Exception) -> RunError:
        free = shutil.disk_usage(self.path).free / 2**20
        return RunError(f"rank {rank} could not write checkpoint {self.path / tag} ({err}); {free:,.1f} MiB are "
                        f"free there. The checkpoints saved before are intact ({', '.join(self.tags()) or 'none yet'}) "
                        "and --resume continues from the newest; free disk space, lower checkpoint.keep, or move "
                        "run_dir to a larger disk")

    def restore(self, engine, scheduler, tag: str, rank: int) -> Tuple[int, int]:
        """Load a checkpoint into the engine; return its step and the steps skipped up to it.

        On the layout it was saved with, everything is restored. On another one (a different number of
        ranks or ep_size), DeepSpeed places every expert by its global index, but cannot re-partition
        ZeRO's optimizer state: then the weights are loaded, the optimizer starts afresh, and a warning
        says so. The LR schedule continues from where it was either way (it waits on skipped steps).
        """
        try:
            try:
                _, client = engine.load_checkpoint(str(self.path), tag=tag)
                layout_error = None
            except ZeRORuntimeException as err:
                _, client = self.load_weights(engine, tag)
                layout_error = err
            if client is None:
                raise OSError("DeepSpeed found nothing to load")
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
            # Verified checkpoints load; this is an unverified one (or the disk failed since pre-flight).
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunError(f"rank {rank} could not load checkpoint {self.path / tag} ({first}); "
                           "sparsemixer-ds check --resume lists the checkpoints and their state: resume another "
                           "with --resume-tag TAG") from err
        step, skipped = int(client["step"]), int(client.get("steps_skipped", 0))
        if layout_error is not None:
            for _ in range(step - skipped):
                scheduler.step()
            if rank == 0:
                print(f"WARNING: resuming {tag} on another layout: weights loaded, optimizer state reset "
                      f"(DeepSpeed: {layout_error})", file=sys.stderr, flush=True)
        return step, skipped

    def load_weights(self, engine, tag: str) -> Tuple[str, dict]:
        """Only the model's weights of a checkpoint, on whatever layout the engine has."""
        return engine.load_checkpoint(str(self.path), tag=tag, load_module_only=True,
                                      load_optimizer_states=False, load_lr_scheduler_states=False)

    def remove_partial_checkpoints(self) -> None:
        """Delete the tag directories of saves that never finished (they only take disk space)."""
        complete = set(self.tags())
        for tag in self.tag_dirs():
            if tag not in complete:
                path = self.path / tag
                print(f"removing {path}: an interrupted save (no {COMPLETE} marker)", file=sys.stderr, flush=True)
                shutil.rmtree(path)

    def set_aside_newer(self, tag: str) -> None:
        """Rename the complete tags newer than ``tag``, the one a run resumed: the run saves those steps
        anew, and neither --resume nor checkpoint.keep may take the old ones for its own."""
        for newer in self.tags()[self.tags().index(tag) + 1:]:
            path = self.path / newer
            aside, n = path.with_name(f"{newer}.set-aside"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{newer}.set-aside-{n}")
            print(f"moving {path} aside to {aside}: the run goes on from {tag} and saves its own {newer}; delete it "
                  "when it is no longer wanted", file=sys.stderr, flush=True)
            path.rename(aside)


def tag_step(name: str) -> Optional[int]:
    """The step of a tag directory's name, or None for any other name (``step_00000008.set-aside``)."""
    digits = name[len(TAG_PREFIX):]
    return int(digits) if name.startswith(TAG_PREFIX) and digits.isdigit() else None
