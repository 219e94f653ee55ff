"""A run's directory: every path a run writes, and the rules for reusing one.

    config.yaml               the resolved run config: what fixes the run's trajectory, checked on resume
    ds_config.json            the resolved DeepSpeed config
    starts/start_NNN.yaml     both, as each start of the run resolved them, with what it resumed and changed
    LOCK                      the launch that trains here (sparsemixer_ds.run.runlock)
    metrics.jsonl             one JSON object per line (sparsemixer_ds.run.metrics)
    monitor/                  DeepSpeed's CSV and TensorBoard monitors, unless the DS JSON says where
    training.png              the end-of-run plot
    checkpoints/              the checkpoint store (sparsemixer_ds.run.checkpoints)

What a resume may change is sparsemixer_ds.run.resume's to say.
"""
import json
import os
from pathlib import Path
from typing import Optional, Union

import yaml

from ..config import ConfigError, RunConfig, config_from_dict, dump_yaml
from .checkpoints import CheckpointStore

__all__ = ["RunDir"]


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
        self.store = CheckpointStore(self.checkpoints)

    def check(self, resume: Union[bool, str]) -> Optional[str]:
        """Refuse to overwrite a finished run, to resume one without a checkpoint, or to write where nothing
        can be written; return the tag to resume from. Writes nothing."""
        tags = self.store.tags()
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
        return self.store.resume_tag(resume)

    def saved_config(self) -> RunConfig:
        """The run config the run started with (keys added since then take their defaults)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.config} is missing; it is written when a run starts and holds the model shape")
        return config_from_dict(yaml.safe_load(self.config.read_text()), str(self.config))

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
