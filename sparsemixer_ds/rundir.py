"""A run's directory: every path a run writes, the rules for reusing one, and its checkpoints.

    config.yaml               the resolved run config (what a resume checks the model shape against)
    ds_config.json            the resolved DeepSpeed config
    metrics.jsonl             one JSON object per line (sparsemixer_ds.metrics)
    monitor/                  DeepSpeed's CSV and TensorBoard monitors, unless the DS JSON says where
    training.png              the end-of-run plot
    checkpoints/step_NNNNNNNN/  DeepSpeed's files of one step, and COMPLETE once every rank saved its part

A checkpoint tag without its COMPLETE marker (a save that was interrupted) is never taken for a
checkpoint: not by --resume, not by export.
"""
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml
from deepspeed import comm as dist
from deepspeed.runtime.zero.utils import ZeRORuntimeException

from .config import ConfigError, RunConfig, RunError, config_dict, config_from_dict, dump_yaml

__all__ = ["RunDir", "tag_name"]

TAG_PREFIX = "step_"
COMPLETE = "COMPLETE"  # written into a tag's directory once every rank has saved its part


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


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

    def tags(self) -> List[str]:
        """Complete checkpoint tags, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE).is_file())

    def check(self, cfg: RunConfig, resume: bool, shape_keys: Sequence[str]) -> Optional[str]:
        """Refuse to overwrite a finished or running run, to resume one whose ``shape_keys`` differ from
        ``cfg``'s, or to write where nothing can be written; return the tag to resume from. Writes nothing."""
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
        saved, now = config_dict(self.saved_config()), config_dict(cfg)
        differ = [f"{key}: {_get(saved, key)!r} in the checkpoint, {_get(now, key)!r} now" for key in shape_keys
                  if _get(saved, key) != _get(now, key)]
        if differ:
            raise ConfigError(f"--resume: the checkpoints in {self.path} are of another model shape ("
                              + "; ".join(differ) + "); resume with the run's own settings (its config.yaml)")
        return tags[-1]

    def saved_config(self) -> RunConfig:
        """The run config the run started with (keys added since then take their defaults)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.config} is missing; it is written when a run starts and holds the model shape")
        return config_from_dict(yaml.safe_load(self.config.read_text()), str(self.config))

    def checkpoint(self, tag: Optional[str] = None) -> str:
        """A complete checkpoint's tag: ``tag`` itself, or the newest when None; a clear error if none."""
        tags = self.tags()
        if not tags:
            raise ConfigError(f"{self.checkpoints} holds no checkpoint; train first or point --run at a run directory")
        if tag is None:
            return tags[-1]
        if tag not in tags:
            raise ConfigError(f"checkpoint tag {tag!r} is not in {self.checkpoints}; it has {', '.join(tags)}")
        return tag

    def fill_monitor_paths(self, ds_config: dict) -> None:
        """Monitors enabled in the DS JSON without an output path write into the run directory."""
        for name in ("tensorboard", "csv_monitor"):
            block = ds_config.get(name)
            if isinstance(block, dict) and block.get("enabled"):
                block.setdefault("output_path", str(self.monitor))
                block.setdefault("job_name", "train")

    def write_configs(self, cfg: RunConfig, ds_config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(dump_yaml(cfg))
        self.ds_config.write_text(json.dumps(ds_config, indent=2))

    def save(self, engine, cfg: RunConfig, step: int, tokens: int, skipped: int, rank: int) -> None:
        """Save through DeepSpeed (experts per expert), mark the tag complete once every rank's part is
        written, then keep only the newest ``checkpoint.keep``. A save that fails (a full disk) raises a
        RunError on the rank it failed on; the tag stays unmarked, so no resume takes it."""
        # Not "skipped_steps": DeepSpeed's own state has one, and load_checkpoint removes it from the client's.
        client = {"step": step, "tokens": tokens, "steps_skipped": skipped, "config": config_dict(cfg)}
        tag = tag_name(step)
        try:
            engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state=client)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            raise self._save_failed(tag, rank, err) from err
        dist.barrier()  # every rank's files are written
        if rank == 0:
            marker = self.checkpoints / tag / COMPLETE
            partial = marker.with_suffix(".tmp")
            try:
                partial.write_text(json.dumps({"step": step, "tokens": tokens}))
            except OSError as err:
                raise self._save_failed(tag, rank, err) from err
            partial.replace(marker)  # atomic: the tag is complete or it is not
            for old in self.tags()[:-cfg.checkpoint.keep]:
                shutil.rmtree(self.checkpoints / old)
        dist.barrier()

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
            _, client = engine.load_checkpoint(str(self.checkpoints), tag=tag)
            layout_error = None
        except ZeRORuntimeException as err:
            _, client = self.load_weights(engine, tag)
            layout_error = err
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
        for path in sorted(self.checkpoints.glob(f"{TAG_PREFIX}*")):
            if path.is_dir() and path.name not in complete:
                print(f"removing {path}: an interrupted save (no {COMPLETE} marker)", file=sys.stderr, flush=True)
                shutil.rmtree(path)


def _get(values: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return values.get(section, {}).get(key)
