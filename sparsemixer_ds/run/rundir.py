"""A run's directory: every path a run writes, the rules for reusing one, and its checkpoints.

    config.yaml               the resolved run config: what fixes the run's trajectory, checked on resume
    ds_config.json            the resolved DeepSpeed config
    starts/start_NNN.yaml     both, as each start of the run resolved them, with what it resumed and changed
    LOCK                      the launch that trains here (sparsemixer_ds.run.runlock)
    metrics.jsonl             one JSON object per line (sparsemixer_ds.run.metrics)
    monitor/                  DeepSpeed's CSV and TensorBoard monitors, unless the DS JSON says where
    training.png              the end-of-run plot
    checkpoints/step_NNNNNNNN/  DeepSpeed's files of one step, and COMPLETE once every rank saved its part

A checkpoint tag without its COMPLETE marker (a save that was interrupted) is never taken for a
checkpoint: not by --resume, not by export. The marker records the size and SHA-256 of every file of
the tag, so a file truncated, zeroed, altered or deleted since is found before anything loads it
(``verify``); --resume then takes the newest intact tag, --resume-tag refuses. Markers written before
they held checksums (only step and tokens) are taken as "unverified".
"""
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import yaml
from deepspeed import comm as dist
from deepspeed.runtime.zero.utils import ZeRORuntimeException

from ..config import ConfigError, RunConfig, RunError, config_dict, config_from_dict, dump_yaml, total_steps
from .checksums import ALGORITHM, file_digests
from .optim import warmup_cosine

__all__ = ["RunDir", "TagState", "tag_name"]

TAG_PREFIX = "step_"
# What a resume may change besides the run's length (LENGTH_KEYS): where and how the run is watched,
# how long it waits, and its layout (a checkpoint restores onto another ep_size or world size). Every
# other setting fixes the trajectory, and the run's saved config holds it.
FREE_ON_RESUME = ("run_dir", "ds_config", "moe.ep_size", "eval.", "checkpoint.", "logging.", "train.max_skipped_steps",
                  "train.collective_timeout_s", "train.stop_grace_s")
LENGTH_KEYS = ("train.steps", "train.tokens")
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


class RunDir:
    """The files of the run in ``path``; nothing is created until a method writes."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.ds_config = self.path / "ds_config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.monitor = self.path / "monitor"
        self.plot = self.path / "training.png"
        self.checkpoints = self.path / "checkpoints"
        self.starts = self.path / "starts"
        self.verified: Dict[str, TagState] = {}  # what verify() found, by tag

    def tag_dirs(self) -> List[str]:
        """Every checkpoint tag's directory name, marked complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p.name for p in self.checkpoints.iterdir() if p.is_dir() and _step(p.name) is not None),
                      key=_step)

    def tags(self) -> List[str]:
        """Complete checkpoint tags (marked; whether their files are intact is verify's to say), oldest first."""
        return [tag for tag in self.tag_dirs() if (self.checkpoints / tag / COMPLETE).is_file()]

    def verify(self, tag: str) -> TagState:
        """Check a tag's files against its marker: each there, with the size and SHA-256 it was saved with.
        Remembered in ``verified``. With a process group, every rank must verify the same tags in turn
        (they share the hashing)."""
        if tag not in self.verified:
            self.verified[tag] = self._verify(tag)
        return self.verified[tag]

    def _verify(self, tag: str) -> TagState:
        root = self.checkpoints / tag
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
                raise ConfigError(f"{option} {tag}: {self.checkpoints} has no such checkpoint; it has "
                                  f"{', '.join(self.tag_dirs()) or 'none'}")
            state = self.verify(tag)
            if not state.usable:
                raise ConfigError(f"{option} {tag}: the checkpoint is {state.describe()}; choose another tag "
                                  "(sparsemixer-ds check --resume lists them and their state)")
            return tag
        for candidate in reversed(self.tag_dirs()):
            if self.verify(candidate).usable:
                return candidate
        raise ConfigError(f"{self.checkpoints} holds no intact checkpoint (" + "; ".join(
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
        lines = [f"checkpoints in {self.checkpoints}:"]
        for state in self.states():
            arrow = "  <- resume" if state.tag == chosen else ""
            lines.append(f"  {state.tag}  {state.describe()}{arrow}")
        return "\n".join(lines)

    def check(self, cfg: RunConfig, resume: bool) -> Optional[str]:
        """Refuse to overwrite a finished run, to resume one without a checkpoint, or to write where nothing
        can be written; return the tag to resume from. Writes nothing."""
        tags = self.tags()
        if resume and not tags:
            raise ConfigError(f"--resume: {self.checkpoints} has no checkpoint to resume from; start without --resume")
        if not resume and (tags or self.metrics.exists()):
            raise ConfigError(f"run_dir {self.path} already holds a run; pass --resume to continue it, "
                              "or set run_dir to a new directory")
        existing = self.path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"run_dir {self.path}: {existing} is a file, not a directory; choose another run_dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"run_dir {self.path}: {existing} is not writable; choose a run_dir you can write to")
        if not resume:
            return None
        return self.resume_tag(resume)

    def resume_changes(self, cfg: RunConfig, shape_keys: Sequence[str], tag: str, world: int) -> List[str]:
        """Check ``cfg`` against the run's saved config (config.yaml) before resuming ``tag``; return what
        changes, said as it will happen. The saved settings are authoritative: another model shape
        (``shape_keys``) or any other setting that fixes the trajectory is refused, listing what differs.
        The run's length may change (the LR schedule is recomputed over it); so may everything in
        FREE_ON_RESUME. Writes nothing."""
        saved_cfg = self.saved_config()
        saved, now = _flat(config_dict(saved_cfg)), _flat(config_dict(cfg))
        keys = list(now) + [key for key in saved if key not in now]  # a free-form mapping (model.hf) may lose keys
        differ = [key for key in keys if key != "model.vocab_size" and saved.get(key) != now.get(key)]
        if saved["model.vocab_size"] and saved["model.vocab_size"] != now["model.vocab_size"]:
            differ.append("model.vocab_size")
        said = {key: f"{key}: {saved.get(key)!r} in the run, {now.get(key)!r} now" for key in differ}
        shape = [said[key] for key in differ if key in shape_keys or key.startswith(tuple(f"{k}." for k in shape_keys))]
        if shape:
            raise ConfigError(f"--resume: the checkpoints in {self.path} are of another model shape ("
                              + "; ".join(shape) + "); resume with the run's own settings (its config.yaml)")
        fixed = [said[key] for key in differ if key not in LENGTH_KEYS and not key.startswith(FREE_ON_RESUME)]
        if fixed:
            raise ConfigError(f"--resume: {self.config} fixes these settings for the run, and they differ ("
                              + "; ".join(fixed) + "). Resume with the run's own values (drop these --set or "
                              "config changes), or start a new run with another run_dir")
        step = int(tag[len(TAG_PREFIX):])
        old_total, new_total = total_steps(saved_cfg, world), total_steps(cfg, world)
        changes = [f"{said[key]}: applied" for key in differ if key not in LENGTH_KEYS]
        if old_total != new_total:
            if new_total <= step:
                raise ConfigError(f"--resume: {tag} is at step {step}, and the run would now end at step {new_total} "
                                  f"({'; '.join(said[key] for key in differ if key in LENGTH_KEYS)}); ask for more "
                                  "steps than the checkpoint has, or export it as it is")
            lr = [cfg.train.lr * warmup_cosine(c, total)(step)
                  for c, total in ((saved_cfg, old_total), (cfg, new_total))]
            changes.append(f"the run's length changes from {old_total} to {new_total} steps "
                           f"({'; '.join(said[key] for key in differ if key in LENGTH_KEYS)}): the learning-rate "
                           f"schedule (warm-up, then cosine to the end) is recomputed over {new_total} steps, so from "
                           f"step {step} on the learning rate is {lr[1]:.4g} where it would have been {lr[0]:.4g}")
        return changes

    def saved_config(self) -> RunConfig:
        """The run config the run started with (keys added since then take their defaults)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.config} is missing; it is written when a run starts and holds the model shape")
        return config_from_dict(yaml.safe_load(self.config.read_text()), str(self.config))

    def checkpoint(self, tag: Optional[str] = None) -> str:
        """A verified checkpoint's tag: ``tag`` itself, or the newest intact one when None (newer damaged ones
        passed over with a warning); a clear error if there is none."""
        tags = self.tags()
        if not tags:
            raise ConfigError(f"{self.checkpoints} holds no checkpoint; train first or point --run at a run directory")
        chosen = self.usable_tag(tag, "--tag")
        for line in self.notes(chosen):
            print(line, file=sys.stderr, flush=True)
        return chosen

    def fill_monitor_paths(self, ds_config: dict) -> None:
        """Monitors enabled in the DS JSON without an output path write into the run directory."""
        for name in ("tensorboard", "csv_monitor"):
            block = ds_config.get(name)
            if isinstance(block, dict) and block.get("enabled"):
                block.setdefault("output_path", str(self.monitor))
                block.setdefault("job_name", "train")

    def write_configs(self, cfg: RunConfig, ds_config: dict, start: dict) -> None:
        """The resolved configs this start runs with, as config.yaml and ds_config.json, and a copy of both
        under starts/ with ``start`` (what was resumed, what changed): every start of the run is kept."""
        self.starts.mkdir(parents=True, exist_ok=True)
        number = len(list(self.starts.glob("start_*.yaml"))) + 1
        header = "".join(f"# {line}\n" for line in json.dumps(start, indent=1).splitlines())
        (self.starts / f"start_{number:03d}.yaml").write_text(header + dump_yaml(cfg))
        (self.starts / f"start_{number:03d}.ds_config.json").write_text(json.dumps(ds_config, indent=2))
        self.config.write_text(dump_yaml(cfg))
        self.ds_config.write_text(json.dumps(ds_config, indent=2))

    def save(self, engine, cfg: RunConfig, step: int, tokens: int, skipped: int, rank: int) -> None:
        """Save through DeepSpeed (experts per expert), mark the tag complete once every rank's part is
        written (the marker records each file's size and SHA-256, the ranks sharing the hashing), then keep
        only the newest ``checkpoint.keep``. A save that fails (a full disk) raises a
        RunError on the rank it failed on; the tag stays unmarked, so no resume takes it."""
        # Not "skipped_steps": DeepSpeed's own state has one, and load_checkpoint removes it from the client's.
        client = {"step": step, "tokens": tokens, "steps_skipped": skipped, "config": config_dict(cfg)}
        tag = tag_name(step)
        marker = self.checkpoints / tag / COMPLETE
        if rank == 0:  # a tag saved again is incomplete until marked again; save_checkpoint begins with a barrier
            marker.unlink(missing_ok=True)
        try:
            engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state=client)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            raise self._save_failed(tag, rank, err) from err
        dist.barrier()  # every rank's files are written
        # Rank 0's listing (on a shared file system it sees every rank's files), hashed by all ranks.
        names = [self._saved_files(tag) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        digests = file_digests(self.checkpoints / tag, names[0])
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
            for old in self.tags()[:-cfg.checkpoint.keep]:
                shutil.rmtree(self.checkpoints / old)
        dist.barrier()

    def _saved_files(self, tag: str) -> List[str]:
        """The files of a tag, relative to its directory, largest first (how file_digests shares them best)."""
        root = self.checkpoints / tag
        files = [p for p in root.rglob("*") if p.is_file() and p.name not in (COMPLETE, f"{COMPLETE}.tmp")]
        return [p.relative_to(root).as_posix() for p in sorted(files, key=lambda p: (-p.stat().st_size, p.name))]

    def _save_failed(self, tag: str, rank: int, err: Exception) -> RunError:
        free = shutil.disk_usage(self.checkpoints).free / 2**20
        return RunError(f"rank {rank} could not write checkpoint {self.checkpoints / tag} ({err}); {free:,.1f} MiB are "
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
                _, client = engine.load_checkpoint(str(self.checkpoints), tag=tag)
                layout_error = None
            except ZeRORuntimeException as err:
                _, client = self.load_weights(engine, tag)
                layout_error = err
            if client is None:
                raise OSError("DeepSpeed found nothing to load")
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
            # Verified checkpoints load; this is an unverified one (or the disk failed since pre-flight).
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunError(f"rank {rank} could not load checkpoint {self.checkpoints / tag} ({first}); "
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
        return engine.load_checkpoint(str(self.checkpoints), tag=tag, load_module_only=True,
                                      load_optimizer_states=False, load_lr_scheduler_states=False)

    def remove_partial_checkpoints(self) -> None:
        """Delete the tag directories of saves that never finished (they only take disk space)."""
        complete = set(self.tags())
        for tag in self.tag_dirs():
            if tag not in complete:
                path = self.checkpoints / tag
                print(f"removing {path}: an interrupted save (no {COMPLETE} marker)", file=sys.stderr, flush=True)
                shutil.rmtree(path)

    def set_aside_newer(self, tag: str) -> None:
        """Rename the complete tags newer than ``tag``, the one a run resumed: the run saves those steps
        anew, and neither --resume nor checkpoint.keep may take the old ones for its own."""
        for newer in self.tags()[self.tags().index(tag) + 1:]:
            path = self.checkpoints / newer
            aside, n = path.with_name(f"{newer}.set-aside"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{newer}.set-aside-{n}")
            print(f"moving {path} aside to {aside}: the run goes on from {tag} and saves its own {newer}; delete it "
                  "when it is no longer wanted", file=sys.stderr, flush=True)
            path.rename(aside)


def _step(name: str) -> Optional[int]:
    """The step of a tag directory's name, or None for any other name (``step_00000008.set-aside``)."""
    digits = name[len(TAG_PREFIX):]
    return int(digits) if name.startswith(TAG_PREFIX) and digits.isdigit() else None


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
