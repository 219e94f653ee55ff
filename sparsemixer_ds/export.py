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
from .model import MoELM

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


def resolve_checkpoint(run_dir: Path, tag: Optional[str]) -> Tuple[Path, str]:
    """The checkpoint directory and tag (the newest when ``tag`` is None), or a clear error."""
    from .train import CHECKPOINTS, checkpoint_tags
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    tags = checkpoint_tags(ckpt_dir)
    if not tags:
        raise ConfigError(f"{ckpt_dir} holds no checkpoint; train first or point --run at a run directory")
    if tag is None:
        return ckpt_dir, tags[-1]
    if tag not in tags:
        raise ConfigError(f"checkpoint tag {tag!r} is not in {ckpt_dir}; it has {', '.join(tags)}")
    return ckpt_dir, tag


def load_checkpoint_model(run_dir: Path, tag: Optional[str] = None) -> Tuple[MoELM, RunConfig]:
    """The model of a run's checkpoint, all experts on this process (ep_size = 1), on the CPU."""
    import deepspeed
    run_dir = Path(run_dir)
    ckpt_dir, tag = resolve_checkpoint(run_dir, tag)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} is missing; it is written when a run starts and holds the model shape")
    import yaml
    cfg = config_from_dict(yaml.safe_load(config_path.read_text()), str(config_path))
    cfg.moe.ep_size = 1
    _single_process_group()
    torch.manual_seed(0)
    model = MoELM(cfg.model, cfg.moe)
    engine, _, _, _ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    return engine.module.float().cpu().eval(), cfg


def tokenizer_record(data_dir: Path) -> dict:
    """What generation needs of the tokenizer, stored inside the export."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    record = {"kind": meta["tokenizer"], "json": None}
    if meta["tokenizer"] == "bpe":
        record["json"] = (Path(data_dir) / "tokenizer.json").read_text()
    return record


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
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out_path)  # never a half-written export under the final name
    return out_path


def load_export(path: Path) -> Tuple[MoELM, RunConfig, dict]:
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
    model = MoELM(cfg.model, cfg.moe)
    model.load_state_dict(tensors)
    return model.eval(), cfg, json.loads(metadata["tokenizer"])
