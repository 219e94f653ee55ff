"""Consolidate a DeepSpeed checkpoint into one file that loads without DeepSpeed's engine.

DeepSpeed saves the non-expert weights once and every expert in a file of its own, named by its
global index. Loading a checkpoint into a single-process engine with ep_size = 1 gathers all of
them (DeepSpeed maps global expert ids onto local ones), whatever layout the run trained with.
"""
import json
import os
import socket
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, RunConfig, config_dict, config_from_dict
from .data import tokenizer_record
from .families import get_family
from .rundir import RunDir

EXPORT_FORMAT = "sparsemixer_ds.export/2"


def _single_process_group() -> None:
    """A world of one for DeepSpeed's engine, when no launcher set one up."""
    from .comm import init_distributed
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


def load_checkpoint_model(run_dir: Path, tag: Optional[str] = None) -> Tuple[torch.nn.Module, RunConfig]:
    """The model of a run's checkpoint (the newest unless ``tag``), all experts on this process
    (ep_size = 1), on the CPU."""
    import deepspeed
    run = RunDir(run_dir)
    tag = run.checkpoint(tag)
    cfg = run.saved_config()
    cfg.moe.ep_size = 1
    _single_process_group()
    torch.manual_seed(0)
    model = get_family(cfg).build(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})
    run.load_weights(engine, tag)
    return engine.module.float().cpu().eval(), cfg


def export(run_dir: Path, out_path: Path, tag: Optional[str] = None) -> Path:
    """Write the consolidated weights of a checkpoint to ``out_path`` (safetensors), with the model
    config and the tokenizer in the file's metadata: one file, and nothing in it can run code."""
    out_path = Path(out_path)
    if out_path.exists():
        raise ConfigError(f"{out_path} already exists; choose another --out or remove it first")
    model, cfg = load_checkpoint_model(run_dir, tag)
    metadata = {
        "format": EXPORT_FORMAT,
        "config": json.dumps(config_dict(cfg)),
        "tokenizer": json.dumps(tokenizer_record(Path(cfg.data.path))),
    }
    tensors = get_family(cfg).export_state(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out_path)  # never a half-written export under the final name
    return out_path


def load_export(path: Path) -> Tuple[torch.nn.Module, RunConfig, dict]:
    """(model, config, tokenizer record) from an export file; no DeepSpeed engine, no unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"export file {path} does not exist; write one with sparsemixer-ds export")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} is not a safetensors file written by sparsemixer-ds export ({err})") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path} is not a sparsemixer_ds export (its metadata lacks format {EXPORT_FORMAT})")
    cfg = config_from_dict(json.loads(metadata["config"]), str(path))
    family = get_family(cfg)
    model = family.build(cfg)
    family.load_export_state(model, tensors)
    return model.eval(), cfg, json.loads(metadata["tokenizer"])
