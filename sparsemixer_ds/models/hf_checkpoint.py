"""Hugging Face checkpoints out of and into runs of the hf family (sparsemixer_ds.models.hf).

Out: ``export_hf(run_dir, out_dir)`` (``sparsemixer-ds export --format hf``) writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
without DeepSpeed or this package: config.json (the run's HF config, the data's vocabulary, its eos
id, ``output_router_logits`` false), the weights in safetensors under HF's own names and layout, and
the data's tokenizer.

In: ``check_init_from`` and ``load_init_weights`` (``sparsemixer-ds train --init-from DIR``) start a
run from such a directory, or any local one written by ``save_pretrained``, whose config fixes the
same weight shapes as the run's. The weights go into the HF model before ``deepspeed.initialize``,
so AutoEP repacks them onto whatever expert-parallel layout the run has.

The mapping between AutoEP's layer and the HF block it replaced is the inverse of AutoEP's repacking
(deepspeed/moe/ep_repack.py), read from AutoEP's own detection of the block (its ``MoELayerSpec``):

    router:   layer.router.gate.weight [E, M]        -> <block>.<router_name>.weight
              (PhiMoE ``mlp.router.weight``; Mixtral and Qwen3-MoE ``mlp.gate.weight``)
    experts:  w1 [E, I, M] (gate), w3 [E, I, M] (up) -> <block>.experts.gate_up_proj [E, 2I, M], gate rows first
              w2 [E, M, I] (down)                   -> <block>.experts.down_proj [E, M, I]
              (transformers' alternate fused layout, gate_up_proj [E, M, 2I] and down_proj [E, I, M], is
              the same tensors transposed; experts stored apart (w3 named) map one to one)

The tensors are checked name by name and shape by shape against HF's class and written by its own
``save_pretrained``, which stores them as transformers has always stored these models (Mixtral and
PhiMoE: ``block_sparse_moe.gate.weight`` and per expert ``block_sparse_moe.experts.N.w1/w2/w3.weight``,
the layout of their hub checkpoints, which older transformers releases and other runtimes read);
``from_pretrained`` converts them back to the fused layout above.

The midpoint estimator's output scale omega [M] multiplies the MoE block's output, a sum of expert
outputs each ending in the down projection: omega * sum_k w_k W2_k h_k = sum_k w_k (diag(omega) W2_k) h_k.
So it folds exactly into down_proj (each row m of every expert's W2 times omega[m]) and the exported
model has no parameter HF's class lacks; a run started from it begins with omega = 1, the same function.

What HF's class computes from these weights is its own forward. PhiMoE's is SparseMixer's eval rule
(the argmax of the jitter-masked softmax, weighted by its probability), always top-2. Mixtral's and
Qwen3-MoE's route with a softmax top-k (Mixtral's renormalised over the k chosen), which SparseMixer
never trained with; ``routing_notes`` says so for each export.

Shape legend: E experts, M model dim, I expert hidden dim.
"""
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..data.loader import tokenizer_dir
from ..data.prepared import read_meta
from ..data.tokenizer import EOS_TOKEN, BpeTokenizer, ByteTokenizer
from ..run.rundir import RunDir
from .families import InitSource

__all__ = ["export_hf", "hf_state_dict", "routing_notes", "write_tokenizer", "byte_level_tokenizer", "init_source",
           "load_init_weights", "SHAPE_FIELDS"]

# HF config fields that fix the shape of some weight of a supported model (the families of sparsemixer_ds.models.hf).
# A checkpoint loads into a run only if each that either config has is the same in both.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts",
                "tie_word_embeddings", "attention_bias", "lm_head_bias", "mlp_bias", "mlp_only_layers",
                "decoder_sparse_step", "shared_expert_intermediate_size")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------- export

def _checked_out_dir(out_dir: Path) -> Path:
    """``out_dir`` where an export may be written: new, or an empty directory (never written over)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} already exists and is not an empty directory; choose another --out "
                          "or remove it first")
    return out_dir


def _hf_run_config(run_dir: Path) -> RunConfig:
    cfg = RunDir(run_dir).saved_config()
    if cfg.model.family != "hf":
        raise ConfigError(f"--format hf: the run in {run_dir} is model.family {cfg.model.family!r}, this project's own "
                          "decoder, which has no Hugging Face class; export it with --format safetensors (the "
                          "default), or train a model.family hf run to export it this way")
    return cfg


def export_hf(run_dir: Path, out_dir: Path, tag: Optional[str] = None) -> List[str]:
    """Write a checkpoint of an hf-family run (the newest unless ``tag``) to ``out_dir`` as a Hugging
    Face model directory: config.json, generation_config.json, the weights in safetensors (every expert,
    whatever ``ep_size`` the run trained with) and the data's tokenizer. Returns notes on how HF's forward
    routes these weights (``routing_notes``). Refuses a run of another family, or an ``out_dir`` that
    exists and is not empty, before loading anything; writes into a sibling directory and renames it."""
    from ..export import load_checkpoint_model
    from . import hf

    out_dir = _checked_out_dir(out_dir)
    eos_id = _tokenizer_eos(tokenizer_dir(_hf_run_config(run_dir)))  # the data's tokenizer is there to write
    model, cfg = load_checkpoint_model(run_dir, tag)  # ep_size 1: every expert on this process
    config = hf.hf_config(cfg)
    config.eos_token_id = config.bos_token_id = eos_id  # the data's document separator (defaults point at bytes)
    tensors = hf_state_dict(model)

    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_config(config)  # HF's own class, float32 like the tensors
    plain.load_state_dict(tensors, strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # an export interrupted earlier
    plain.save_pretrained(str(tmp), safe_serialization=True)
    write_tokenizer(tokenizer_dir(cfg), tmp, config.max_position_embeddings)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)  # never a half-written export under the final name
    return routing_notes(cfg, config)


def hf_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors of ``model`` (an hf-family model after ``deepspeed.initialize`` with every expert on
    this process: ``load_checkpoint_model``) under the names and in the layout of HF's class for its
    config: AutoEP's layers mapped back (see the module docstring), omega folded into down_proj.
    Checked name by name and shape by shape against HF's class."""
    from transformers import AutoModelForCausalLM

    from . import autoep, hf

    config = model.config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    want = plain.state_dict()
    # AutoEP's detection of the blocks, as the run configured it (sparsemixer_ds.models.hf), on the plain model.
    section = {"enabled": True, "autoep_size": 1, **hf.MODEL_TYPES[config.model_type]}
    specs = autoep.autoep_specs(plain, {"expert_parallel": section}, f"the {config.model_type} model")
    state = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    mapped_prefixes = []
    for spec in specs:
        block = spec.moe_module_name
        layer = model.get_submodule(block)
        if getattr(layer, "num_local_experts", None) != spec.num_experts:
            raise ValueError(f"{block}: {getattr(layer, 'num_local_experts', None)} of {spec.num_experts} experts on "
                             "this process; load the checkpoint with ep_size 1 (load_checkpoint_model)")
        omega = _omega(model, block)
        if omega is not None and getattr(layer, "shared_experts", None) is not None:
            raise ValueError(f"{block}: omega scales the shared experts' output too, which down_proj of the routed "
                             "experts cannot carry; this model cannot be exported with the midpoint estimator")
        for name, param in layer.router.gate.named_parameters():
            out[f"{block}.{spec.router_name}.{name}"] = param.detach()
        out.update(_experts_to_hf(layer.experts, spec, f"{block}.{spec.experts_name}", want, omega))
        # The rest of the block (shared experts, if any) kept its HF names inside AutoEP's layer.
        inner = {"router", "experts", spec.router_name, spec.router_logits_capture_layer_name or "router"}
        for name, tensor in state.items():
            if name.startswith(f"{block}.") and name[len(block) + 1:].split(".")[0] not in inner:
                out.setdefault(name, tensor)
        mapped_prefixes += [f"{block}.", f"{block}_omega."]
    for name, tensor in state.items():
        if not name.startswith(tuple(mapped_prefixes)):
            out[name] = tensor
    out = {name: tensor.detach().float().contiguous().clone() for name, tensor in out.items()}
    missing, unexpected = sorted(want.keys() - out.keys()), sorted(out.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"the model's tensors do not map onto {type(plain).__name__}'s: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    shapes = [f"{name} {tuple(out[name].shape)}, HF's {tuple(want[name].shape)}" for name in want
              if out[name].shape != want[name].shape]
    if shapes:
        raise ValueError(f"the mapped tensors' shapes differ from {type(plain).__name__}'s: {'; '.join(shapes[:4])}")
    return out


def _omega(model: nn.Module, block: str) -> Optional[torch.Tensor]:
    """The midpoint estimator's output scale beside ``block`` ([M]), or None (no midpoint estimator)."""
    parent_name, _, child = block.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    scale = getattr(parent, f"{child}_omega", None)
    return None if scale is None else scale.omega.detach()


def _experts_to_hf(experts: nn.Module, spec, prefix: str, want: Dict[str, torch.Tensor],
                   omega: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """AutoEP's grouped experts w1 [E, I, M] (gate), w3 [E, I, M] (up), w2 [E, M, I] (down) as the HF
    tensors AutoEP repacked them from (deepspeed/moe/ep_repack.py, inverted), omega folded into down."""
    if spec.expert_storage != "fused_3d":
        raise ValueError(f"{spec.moe_module_name}: experts stored as {spec.expert_storage!r} (a transformers release "
                         "before 5.0); only the fused 3-D layout of transformers >= 5 is exported")
    w1, w2, w3 = (experts.w1.detach(), experts.w2.detach(), experts.w3.detach())
    if omega is not None:
        w2 = w2 * omega.to(w2.dtype)[None, :, None]  # diag(omega) W2: row m of each expert's down times omega[m]
    up_name, down_name = f"{prefix}.{spec.expert_w1_name}", f"{prefix}.{spec.expert_w2_name}"
    if spec.expert_w3_name is not None:  # gate and up stored apart: one to one
        return {up_name: w1, f"{prefix}.{spec.expert_w3_name}": w3, down_name: w2}
    num, inner, dim = w1.shape
    gate_up = torch.cat([w1, w3], dim=1)  # [E, 2I, M]: gate rows first, as ep_repack splits them
    if tuple(want[up_name].shape) == (num, 2 * inner, dim) and tuple(want[down_name].shape) == (num, dim, inner):
        return {up_name: gate_up, down_name: w2}
    if tuple(want[up_name].shape) == (num, dim, 2 * inner) and tuple(want[down_name].shape) == (num, inner, dim):
        return {up_name: gate_up.transpose(1, 2), down_name: w2.transpose(1, 2)}  # the alternate fused layout
    raise ValueError(f"{prefix}: HF's {spec.expert_w1_name} {tuple(want[up_name].shape)} and {spec.expert_w2_name} "
                     f"{tuple(want[down_name].shape)} fit neither fused layout of {num} experts, I={inner}, M={dim}")


def routing_notes(cfg: RunConfig, config) -> List[str]:
    """How the exported model's own (HF) forward routes, where that is not the trained model's eval rule."""
    from ..routing.registry import ROUTERS
    rule = f"SparseMixer's eval rule ({ROUTERS[cfg.moe.router].estimator}, top-{config.num_experts_per_tok})"
    if config.model_type == "phimoe":
        if config.num_experts_per_tok == 2:
            return []
        return [f"transformers' PhiMoE routes top-2 whatever num_experts_per_tok says; this model trained "
                f"top-{config.num_experts_per_tok}, so its HF forward is not the trained model's {rule}"]
    renormalised = config.model_type == "mixtral" or getattr(config, "norm_topk_prob", False)
    return [f"transformers' {type(config).__name__[:-len('Config')]} routes with a softmax top-"
            f"{config.num_experts_per_tok}{' renormalised over the chosen experts' if renormalised else ''}, without "
            f"a jitter mask; the trained model's evaluation used {rule}: the weights are the trained ones, the "
            "routing is HF's"]


# ------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer():
    """A ``tokenizers`` Tokenizer whose ids are ByteTokenizer's: UTF-8 byte b -> id b, eos
    ``<|endoftext|>`` -> 256. A BPE model without merges over the ByteLevel alphabet (the character
    of byte b has id b), ByteLevel pre-tokenizer without regex or prefix space, ByteLevel decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    assert tokenizer.token_to_id(EOS_TOKEN) == ByteTokenizer.eos_id
    return tokenizer


def _data_tokenizer(data_dir: Path):
    """The data directory's tokenizer as a ``tokenizers`` Tokenizer with the project's eos."""
    if read_meta(data_dir)["tokenizer"] == "bytes":
        return byte_level_tokenizer()
    return BpeTokenizer.from_file(Path(data_dir) / "tokenizer.json")._tokenizer


def _tokenizer_eos(data_dir: Path) -> int:
    return _data_tokenizer(data_dir).token_to_id(EOS_TOKEN)


def write_tokenizer(data_dir: Path, out_dir: Path, max_length: int) -> None:
    """The data's tokenizer (bytes or BPE) as a transformers fast tokenizer in ``out_dir``: the same ids
    as the project's tokenizer, eos ``<|endoftext|>``, the literal text of eos encoded as text (as
    ``prepare`` encoded documents), no special tokens added around a text; ``max_length``: the
    model's context (transformers warns about longer inputs)."""
    from transformers import PreTrainedTokenizerFast
    wrapped = PreTrainedTokenizerFast(tokenizer_object=_data_tokenizer(data_dir), eos_token=EOS_TOKEN,
                                      split_special_tokens=True, model_max_length=max_length)
    wrapped.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------- import

def _read_config_json(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--init-from {path}: no config.json there; give a Hugging Face model directory (written "
                          "by sparsemixer-ds export --format hf or a model's save_pretrained)")
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--init-from {path}: config.json is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--init-from {path}: config.json holds a JSON {type(values).__name__}, not an object")
    return values


def init_source(cfg: RunConfig, path: Path) -> InitSource:
    """Check before any work that the hf-family run ``cfg`` (model.vocab_size filled in) can start from the HF
    model directory ``path`` (``HFFamily.check_init_from``): config.json and safetensors weights there, the
    same model_type, and every field of SHAPE_FIELDS equal. The ConfigError names what differs."""
    from . import hf

    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"--init-from {path}: not a directory; give a Hugging Face model directory")
    values = _read_config_json(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ConfigError(f"--init-from {path}: no safetensors weights ({' or '.join(WEIGHT_FILES)}); it holds "
                          f"{found}. Only safetensors load (a pickled pytorch_model.bin can run code): save the model "
                          "with save_pretrained(..., safe_serialization=True)")
    config = hf.hf_config(cfg)
    theirs = values.get("model_type")
    if theirs != config.model_type:
        raise ConfigError(f"--init-from {path}: its model_type is {theirs!r}, the run's is {config.model_type!r}; "
                          f"start from a {config.model_type} checkpoint, or set model.hf_config to {path} to train "
                          "its architecture")
    from transformers import AutoConfig
    try:
        ckpt = AutoConfig.for_model(theirs, **{k: v for k, v in values.items() if k != "model_type"})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--init-from {path}: transformers refuses its config.json ({err})") from None
    run, other = config.to_dict(), ckpt.to_dict()
    differ = [f"{key}: {other.get(key)!r} in the checkpoint, {run.get(key)!r} in the run" for key in SHAPE_FIELDS
              if (key in run or key in other) and run.get(key) != other.get(key)]
    if not differ:  # a field this list lacks may still fix a shape: compare the weights HF's class would make
        differ = _shape_differences(config, ckpt, run, other)
    if differ:
        vocab = (" (the run's vocab_size is the data's: prepare the data with the checkpoint's tokenizer, "
                 f"--tokenizer {path / 'tokenizer.json'})" if run.get("vocab_size") != other.get("vocab_size") else "")
        raise ConfigError(f"--init-from {path}: its config.json fixes other weight shapes than the run's HF config ("
                          + "; ".join(differ) + f"){vocab}; make model.hf match it, or set model.hf_config to {path}")
    skip = {"architectures", "transformers_version", "dtype", "torch_dtype", "output_router_logits",
            "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}
    notes = tuple(f"{key}: {other.get(key)!r} in the checkpoint, {run.get(key)!r} in the run (the run's applies)"
                  for key in sorted(run.keys() | other.keys()) if key not in skip and run.get(key) != other.get(key))
    return InitSource(str(path), notes)


def _shape_differences(config, ckpt, run: dict, other: dict) -> List[str]:
    """The config fields that differ, if the two configs make weights of different names or shapes."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        ours = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        theirs = {k: v.shape for k, v in AutoModelForCausalLM.from_config(ckpt).state_dict().items()}
    if ours == theirs:
        return []
    return [f"{key}: {other.get(key)!r} in the checkpoint, {run.get(key)!r} in the run"
            for key in sorted(run.keys() | other.keys()) if run.get(key) != other.get(key)] or \
        ["the same config fields, yet other weight shapes"]


def load_init_weights(model: nn.Module, source: InitSource) -> None:
    """Copy the checkpoint's weights into ``model``, an hf-family model as ``HFFamily.build`` made it
    (before ``deepspeed.initialize``). transformers reads the directory (shards, tied weights, its
    own conversions of older layouts); every parameter the run has must come from it except the
    midpoint estimator's omega, which starts at 1 (an export folded it into down_proj)."""
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto", local_files_only=True)
    with torch.no_grad():
        result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [name for name in result.missing_keys if not name.endswith("_omega.omega")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"--init-from {source.path}: its weights do not fit the run's model (missing "
                          f"{missing[:6]}, unexpected {result.unexpected_keys[:6]})")

