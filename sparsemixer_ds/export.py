"""Consolidate a DeepSpeed checkpoint into one file that loads without DeepSpeed's engine.

DeepSpeed saves the non-expert weights once and every expert in a file of its own, named by its
global index. Loading a checkpoint into a single-process engine with ep_size = 1 gathers all of
them (DeepSpeed maps global expert ids onto local ones), whatever layout the run trained with.

The file's metadata holds the format, the run config, the tokenizer and the SHA-256 of every tensor
(``sha256``: a JSON object, tensor name -> hex digest), checked on load; exports written before the
digests were added load unchecked.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, RunConfig, config_dict, config_from_dict
from .data.loader import tokenizer_dir
from .data.prepared import tokenizer_record
from .models.families import get_family
from .run.checksums import ALGORITHM, tensor_digest
from .run.comm import single_process_group
from .run.rundir import RunDir

EXPORT_FORMAT = "sparsemixer_ds.export/2"


def load_checkpoint_model(run_dir: Path, tag: Optional[str] = None) -> Tuple[torch.nn.Module, RunConfig]:
    """The model of a run's checkpoint (the newest unless ``tag``), all experts on this process
    (ep_size = 1), on the CPU. Family hf: AutoEP's layers, each holding every expert."""
    import deepspeed
    run = RunDir(run_dir)
    tag = run.store.choose(tag)
    cfg = run.saved_config()
    cfg.moe.ep_size = 1
    single_process_group()
    family = get_family(cfg)
    ds = {"train_micro_batch_size_per_gpu": 1}
    ds.update(family.ds_config(cfg, ds, "export"))  # family hf: AutoEP's section, so its layers exist before loading
    torch.manual_seed(0)
    model = family.build(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    if list((run.checkpoints / tag).glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        _load_zero3_weights(engine.module, run.checkpoints / tag)
    else:
        run.store.load_weights(engine, tag)
    return engine.module.float().cpu().eval(), cfg


def _load_zero3_weights(module: torch.nn.Module, checkpoint_dir: Path) -> None:
    """A ZeRO-3 checkpoint's weights (each rank's partitions; AutoEP's experts partitioned over their
    groups), which DeepSpeed loads only onto the layout that saved them, into ``module`` on this one
    process: DeepSpeed's universal-checkpoint conversion consolidates every parameter (experts by
    their global index) into a temporary directory (weights and AdamW moments: three times the
    model's fp32 size on disk for a while), read back name by name."""
    import argparse
    import contextlib
    import sys
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    missing = []
    with tempfile.TemporaryDirectory(prefix="sparsemixer-export-") as tmp, contextlib.redirect_stdout(sys.stderr):
        to_universal(argparse.Namespace(input_folder=str(checkpoint_dir), output_folder=tmp, num_extract_workers=1,
                                        num_merge_workers=1, keep_temp_folder=False, strict=True,
                                        inject_missing_state=False))
        with torch.no_grad():
            for name, param in module.named_parameters():  # a tied parameter once, under its first name
                path = Path(tmp) / "zero" / name / "fp32.pt"
                if path.is_file():
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                    param.copy_((saved["param"] if isinstance(saved, dict) else saved).view(param.shape))  # experts: a dict
                else:
                    missing.append(name)
    if missing:
        raise ConfigError(f"{checkpoint_dir}: DeepSpeed's conversion of this ZeRO-3 checkpoint holds no "
                          f"{_names(missing)}; it does not belong to this run's model (its config.yaml)")


def export(run_dir: Path, out_path: Path, tag: Optional[str] = None) -> Path:
    """Write the consolidated weights of a checkpoint to ``out_path`` (safetensors), with the model
    config and the tokenizer in the file's metadata: one file, and nothing in it can run code."""
    out_path = Path(out_path)
    if out_path.exists():
        raise ConfigError(f"{out_path} already exists; choose another --out or remove it first")
    model, cfg = load_checkpoint_model(run_dir, tag)
    tensors = get_family(cfg).export_state(model)
    metadata = {
        "format": EXPORT_FORMAT,
        "config": json.dumps(config_dict(cfg)),
        "tokenizer": json.dumps(tokenizer_record(tokenizer_dir(cfg))),
        ALGORITHM: json.dumps({name: tensor_digest(tensor) for name, tensor in sorted(tensors.items())}),
    }
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
    _check_digests(path, tensors, metadata)
    cfg = config_from_dict(_metadata_json(path, metadata, "config", dict), str(path))
    record = _metadata_json(path, metadata, "tokenizer", dict)
    family = get_family(cfg)
    model = family.build(cfg)
    try:
        family.load_export_state(model, tensors)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(f"{path}: its tensors do not fit the model its config describes ("
                          f"{_misfit(family.export_state(model), tensors) or str(err).splitlines()[0]}); export "
                          "the checkpoint again with sparsemixer-ds export") from None
    return model.eval(), cfg, record


_REEXPORT = "export the checkpoint again with sparsemixer-ds export"


def _metadata_json(path: Path, metadata: dict, key: str, kind: type):
    """A JSON value of the export's metadata, or a ConfigError naming the file and the key."""
    if key not in metadata:
        raise ConfigError(f"{path}: its metadata has no {key!r}, which every export holds; {_REEXPORT}")
    try:
        value = json.loads(metadata[key])
    except ValueError as err:
        raise ConfigError(f"{path}: its metadata's {key!r} is not JSON ({err}); {_REEXPORT}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: its metadata's {key!r} is a {type(value).__name__}, not a {kind.__name__}; "
                          f"{_REEXPORT}")
    return value


def _check_digests(path: Path, tensors: Dict[str, torch.Tensor], metadata: dict) -> None:
    """Compare every tensor with the digest the export recorded for it (none recorded: an earlier export)."""
    if ALGORITHM not in metadata:
        return
    recorded = _metadata_json(path, metadata, ALGORITHM, dict)
    differ = sorted(name for name in tensors.keys() & recorded.keys() if tensor_digest(tensors[name]) != recorded[name])
    missing, extra = sorted(recorded.keys() - tensors.keys()), sorted(tensors.keys() - recorded.keys())
    problems = [f"{_names(names)} {what}" for names, what in
                ((differ, f"changed since export (their {ALGORITHM} differs from the one recorded)"),
                 (missing, "recorded at export but missing"), (extra, "not there at export")) if names]
    if problems:
        raise ConfigError(f"{path} is damaged: tensors {'; '.join(problems)}; copy the file again or {_REEXPORT}")


def _misfit(want: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> str:
    """How a file's tensors differ from the ones a model holds: names missing, names unexpected, shapes."""
    shapes = [f"{name} is {tuple(got[name].shape)}, the config makes {tuple(want[name].shape)}"
              for name in sorted(want.keys() & got.keys()) if got[name].shape != want[name].shape]
    parts = [f"{label} {_names(names)}" for label, names in
             (("missing", sorted(want.keys() - got.keys())), ("unexpected", sorted(got.keys() - want.keys())))
             if names]
    return "; ".join(parts + shapes[:3] + ([f"and {len(shapes) - 3} more shapes differ"] if len(shapes) > 3 else []))


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
