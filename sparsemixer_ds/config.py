"""Run configuration: typed dataclasses <- YAML file <- ``--set key.sub=value`` overrides.

Two halves, each with one owner:
- the YAML run config owns the model, MoE routing, data, optimisation (batch size, accumulation,
  clipping, learning-rate schedule), evaluation, checkpoints and logging;
- the DeepSpeed JSON owns the engine: ZeRO stage, precision, communication, monitors.
Batch size, accumulation and clipping have one source of truth, the run config: the JSON may repeat
them only with the same values. Every error names the key, the file, the value and the fix.
"""
import dataclasses
import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .routing.registry import ROUTERS, RouterOptionError, RouterOptions


class ConfigError(ValueError):
    """A run or DeepSpeed config that cannot run; the message says where and how to fix it."""


class RunError(RuntimeError):
    """A started run cannot go on; the message says why, what was kept and how to continue."""


@dataclass
class ModelConfig:
    family: str = "native"  # which kind of model (sparsemixer_ds.models.families): native = this project's decoder LM
    vocab_size: int = 0  # 0: take it from the prepared data's meta.json
    d_model: int = 128  # M, the residual width
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128  # T, tokens per training sample
    positions: str = "rotary"  # rotary | learned
    ffn_hidden: int = 512  # hidden width of the dense FFN blocks
    dropout: float = 0.0
    # family hf (sparsemixer_ds.models.hf): the Hugging Face config, inline (model_type and its fields) or a
    # local config.json (or a directory holding one); the native fields above are then not used.
    hf: Dict[str, Any] = field(default_factory=dict)
    hf_config: str = ""


@dataclass
class MoEConfig:
    router: str = "sparsemixer"  # sparsemixer | sparsemixer-v2 | switch | gshard | ablations (routing/registry.py)
    top_k: int = 1  # routes per token: 1 (sparsemixer, switch), 1 or 2 (sparsemixer-v2), 2 (gshard)
    num_experts: int = 8  # E per MoE layer
    moe_every: int = 2  # every moe_every-th block is MoE (Switch: every other one)
    expert_hidden: int = 256  # hidden width of each expert FFN
    ep_size: int = 1  # expert-parallel group size; num_experts and the world size must divide by it
    capacity_factor: float = 1.25  # training slots per expert = ceil(tokens / E * factor * k)
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True  # False: dropless, capacity = the largest expert load
    jitter_eps: float = 0.1  # SparseMixer's jitter mask (switch uses DeepSpeed's fixed input jitter)
    balance_coef: float = 0.01  # weight of the Switch load-balance loss in the training loss (0: none)
    balance: str = "local"  # local: per micro-batch; global: route fractions over all ranks (GRIN; routing/balance.py)
    z_loss_coef: float = 0.0  # weight of the ST-MoE router z-loss (SparseMixer routers only)
    # How SparseMixer routers run the estimator (routing/estimator.py): eager (PyTorch ops, the
    # reference), fused (compiled into a few kernels; same draws, values and gradients) or auto (fused
    # where it is faster and a compiler is available, else eager).
    routing_impl: str = "auto"

    def router_options(self) -> RouterOptions:
        """The router options of this section (unchecked; ``validate`` checks them)."""
        return RouterOptions(estimator=ROUTERS[self.router].estimator, jitter_eps=self.jitter_eps,
                             balance_coef=self.balance_coef, balance=self.balance, z_loss_coef=self.z_loss_coef,
                             routing_impl=self.routing_impl)


@dataclass
class SourceConfig:
    """One source of a mixture (data.sources): a prepared data directory and its share of the batches."""
    path: str = ""  # a directory written by `sparsemixer-ds prepare`
    weight: float = 1.0  # share of the training sequences, relative to the other sources' weights
    name: str = ""  # how metrics name it; "": the directory's name


DEFAULT_DATA_PATH = "data/stdlib-bytes"


@dataclass
class DataConfig:
    path: str = DEFAULT_DATA_PATH  # a directory written by `sparsemixer-ds prepare`
    # A weighted mixture of prepared directories (sharing one tokenizer) instead of data.path:
    # [{path: data/code, weight: 3}, {path: data/web, weight: 1, name: web}] (sparsemixer_ds.data.loader).
    sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    seed: int = 0
    micro_batch: int = 8  # samples per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    steps: int = 1000  # optimizer steps (ignored when tokens > 0)
    tokens: int = 0  # token budget; > 0 sets steps = ceil(tokens / tokens per step)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from 0
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # A step whose loss or gradients are not finite is skipped (weights, optimizer state and LR
    # schedule stay as they were) and counted; after this many in a row the run saves the last good
    # state and stops. 0: never stop. fp16's loss-scale search counts too (at most ~17 in a row
    # from DeepSpeed's default initial_scale_power 16).
    max_skipped_steps: int = 25
    # How long a collective (and the rendezvous at start) waits for the other ranks before the run
    # fails: a rank on a dead node is noticed after this. Long enough for the slowest checkpoint save.
    collective_timeout_s: int = 1800
    # On SIGTERM/SIGINT (preemption, scancel, Ctrl-C) every rank finishes its step, a checkpoint is
    # saved and the run exits; this long after the signal it exits in any case. Below SLURM's
    # KillWait and Kubernetes' terminationGracePeriodSeconds (both 30 s by default), which follow
    # with SIGKILL.
    stop_grace_s: int = 25
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile); the first steps compile
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory
    # Peak FLOP/s per rank (in TFLOP/s) that model FLOPs utilisation is measured against; 0: measured
    # at start-up with a large matmul in the training dtype on the rank's device.
    peak_tflops: float = 0.0


@dataclass
class EvalConfig:
    interval: int = 100  # optimizer steps between evaluations (and one at the end)
    batches: int = 8  # validation batches per rank
    batch_size: int = 8


@dataclass
class CheckpointConfig:
    interval: int = 200  # optimizer steps between checkpoints (and one at the end); 0: only at the end
    keep: int = 2  # the newest checkpoints kept; older ones are deleted


@dataclass
class LoggingConfig:
    interval: int = 10  # optimizer steps between metric lines
    progress: bool = True  # progress bar on rank 0
    plot: bool = True  # loss curves and expert-load heat map as a PNG at the end


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # checkpoints, metrics, plot and the resolved config go here
    ds_config: str = "ds_configs/cpu.json"  # the DeepSpeed engine settings
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error: PyYAML
    would keep the later value and drop the earlier one (a whole section, say) without a word."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "")
        return super().construct_document(node)


class _DuplicateKey(yaml.YAMLError):
    """A mapping key given twice: ``key`` with its dotted path, ``lines`` 1-based."""

    def __init__(self, key: str, lines: Sequence[int]) -> None:
        super().__init__(f"'{key}' is given twice (lines {lines[0]} and {lines[1]})")
        self.key, self.lines = key, lines


def _check_unique_keys(node: yaml.Node, prefix: str) -> None:
    """Raise _DuplicateKey for the first key given twice in a mapping under ``node`` (``prefix``: its path)."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, prefix)
    elif isinstance(node, yaml.MappingNode):
        first_line = {}
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else None
            if key in first_line:
                raise _DuplicateKey(key, [first_line[key], key_node.start_mark.line + 1])
            if key is not None:
                first_line[key] = key_node.start_mark.line + 1
            _check_unique_keys(value_node, f"{key}.")


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


# A number as Python and YAML 1.2 write it (3e-3, 1E5, -2.5e-1, .5). PyYAML reads YAML 1.1, whose
# floats need a dot and a signed exponent, so 3e-3 arrives as a string; float-typed keys take it.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: Any) -> Any:
    """``value`` as a float if it is a string in ordinary float notation, else unchanged."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            List[float]: "a list of numbers", Dict[str, Any]: "a mapping of keys to values"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming the key, the source and the expected type."""
    if tp is float:
        value = _number(value)
    elif tp == List[float] and isinstance(value, list):
        value = [_number(v) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        List[float]: isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        Dict[str, Any]: isinstance(value, dict) and all(isinstance(k, str) for k in value),
    }[tp]
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")
    if tp is float:
        return float(value)
    if tp == List[float]:
        return [float(v) for v in value]
    return value


def _unknown_key(key: str, known: Sequence[str], source: str) -> ConfigError:
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{(section + '.') if section else ''}{close[0]}'?" if close else ""
    where = f"'{section}'" if section else "the top level"
    return ConfigError(f"{source}: unknown key '{key}'{hint} (keys in {where}: {', '.join(known)})")


def _apply(obj: Any, values: dict, prefix: str, source: str) -> None:
    """Write ``values`` (a parsed YAML mapping) onto the dataclass ``obj``, checking every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys to values; "
                          f"got {values!r}")
    by_name = {f.name: f for f in fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in by_name:
            raise _unknown_key(key, list(by_name), source)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.", source)
        elif by_name[name].type == List[SourceConfig]:
            setattr(obj, name, _sources(value, key, source))
        elif isinstance(current, dict) and isinstance(value, dict):
            # A free-form mapping (model.hf): merged, so that --set model.hf.hidden_size=64 changes one field.
            setattr(obj, name, _merged(current, _coerce(value, by_name[name].type, key, source)))
        else:
            setattr(obj, name, _coerce(value, by_name[name].type, key, source))


def _sources(value: Any, key: str, source: str) -> List[SourceConfig]:
    """data.sources from YAML: a list of mappings, each checked key by key like a section."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: '{key}' must be a list of sources, e.g. [{{path: data/code, weight: 3}}, "
                          f"{{path: data/web, weight: 1}}]; got {value!r}")
    items = []
    for i, item in enumerate(value):
        items.append(SourceConfig())
        _apply(items[-1], item, f"{key}[{i}].", source)
    return items


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for name, value in update.items():
        out[name] = _merged(out[name], value) if isinstance(out.get(name), dict) and isinstance(value, dict) else value
    return out


def parse_override(text: str) -> tuple:
    """``'train.steps=50'`` -> ``(['train', 'steps'], 50)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: write overrides as key.sub=value, e.g. --set train.steps=50")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def load_config(path: Optional[Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- the YAML file at ``path`` (if any) <- each ``--set`` override, then validated."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"run config {path} {what}; pass an existing YAML file (configs/ has examples)")
        try:
            values = _load_yaml(path.read_text()) or {}
        except _DuplicateKey as err:
            raise ConfigError(f"{path}: {err}; YAML would keep only the later one: merge them into one") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        _apply(cfg, values, "", str(path))
    for text in overrides:
        keys, value = parse_override(text)
        nested = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested, "", f"--set {text}")
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need no files and no processes."""
    m, moe, t = cfg.model, cfg.moe, cfg.train
    for key, value in (("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                       ("model.seq_len", m.seq_len), ("model.ffn_hidden", m.ffn_hidden),
                       ("moe.num_experts", moe.num_experts), ("moe.moe_every", moe.moe_every),
                       ("moe.expert_hidden", moe.expert_hidden), ("moe.ep_size", moe.ep_size),
                       ("train.micro_batch", t.micro_batch), ("train.grad_accum", t.grad_accum),
                       ("eval.interval", cfg.eval.interval), ("eval.batches", cfg.eval.batches),
                       ("eval.batch_size", cfg.eval.batch_size), ("checkpoint.keep", cfg.checkpoint.keep),
                       ("logging.interval", cfg.logging.interval)):
        _require(value >= 1, f"{key} must be >= 1; got {value}")
    _require(cfg.run_dir.strip() != "", f"run_dir must name a directory; got {cfg.run_dir!r}, which would write the "
             "run into the current directory; set run_dir, e.g. runs/my_run")
    _validate_data(cfg.data)
    _require(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 takes it from the data); got {m.vocab_size}")
    _require(moe.router in ROUTERS, f"moe.router must be one of {', '.join(ROUTERS)}; got {moe.router!r}")
    if m.family == "native":  # family hf: the HF config holds the architecture, checked in sparsemixer_ds.models.hf
        _require(m.d_model % m.n_heads == 0,
                 f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
        _require(m.positions in ("rotary", "learned"),
                 f"model.positions must be 'rotary' or 'learned'; got {m.positions!r}")
        _require(m.positions != "rotary" or (m.d_model // m.n_heads) % 2 == 0,
                 f"rotary positions need an even head size; d_model / n_heads = {m.d_model // m.n_heads}")
        _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1); got {m.dropout}")
        _require(moe.top_k in ROUTERS[moe.router].top_k,
                 f"moe.top_k={moe.top_k} does not fit moe.router={moe.router!r}, which takes top_k in "
                 f"{list(ROUTERS[moe.router].top_k)}")
        _require(moe.top_k <= moe.num_experts, f"moe.top_k={moe.top_k} exceeds moe.num_experts={moe.num_experts}")
        _require(moe.num_experts % moe.ep_size == 0,
                 f"moe.num_experts={moe.num_experts} must be divisible by moe.ep_size={moe.ep_size}: each rank of an "
                 "expert-parallel group holds num_experts / ep_size experts")
    for key, value in (("moe.capacity_factor", moe.capacity_factor),
                       ("moe.eval_capacity_factor", moe.eval_capacity_factor)):
        _require(0.0 < value <= 64.0, f"{key} must be in (0, 64] (1.0 to 2.0 is usual); got {value}")
    _require(moe.min_capacity >= 0, f"moe.min_capacity must be >= 0; got {moe.min_capacity}")
    try:
        moe.router_options().check()
    except RouterOptionError as err:
        raise ConfigError(f"moe.{err}") from None
    _require(t.peak_tflops >= 0.0, f"train.peak_tflops must be >= 0 (0: measure it at start-up); got {t.peak_tflops}")
    _require(t.steps >= 1 or t.tokens > 0, f"train.steps must be >= 1 (or set train.tokens); got {t.steps}")
    _require(t.tokens >= 0, f"train.tokens must be >= 0; got {t.tokens}")
    _require(0.0 < t.lr < 1.0, f"train.lr must be in (0, 1); got {t.lr}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1]; got {t.min_lr_ratio}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0; got {t.warmup_steps}")
    _require(t.weight_decay >= 0.0, f"train.weight_decay must be >= 0; got {t.weight_decay}")
    _require(len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas),
             f"train.betas must be two numbers in [0, 1); got {t.betas}")
    _require(t.grad_clip >= 0.0, f"train.grad_clip must be >= 0 (0 disables clipping); got {t.grad_clip}")
    _require(t.max_skipped_steps >= 0, "train.max_skipped_steps must be >= 0 (0: never stop on non-finite steps); "
             f"got {t.max_skipped_steps}")
    _require(t.collective_timeout_s >= 1, "train.collective_timeout_s must be >= 1 second (default 1800); "
             f"got {t.collective_timeout_s}")
    _require(t.stop_grace_s >= 1, "train.stop_grace_s must be >= 1 second (default 25, under the scheduler's grace "
             f"period); got {t.stop_grace_s}")
    _require(cfg.checkpoint.interval >= 0, f"checkpoint.interval must be >= 0; got {cfg.checkpoint.interval}")


_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def source_name(source: SourceConfig) -> str:
    """What metrics call a source: its ``name``, else its directory's name."""
    return source.name or Path(source.path.rstrip("/")).name or source.path


def _validate_data(data: DataConfig) -> None:
    if not data.sources:
        _require(data.path.strip() != "", "data.path must name a directory written by `sparsemixer-ds prepare`; "
                 f"got {data.path!r}")
        return
    _require(data.path == DEFAULT_DATA_PATH,
             f"data.path={data.path!r} and data.sources are both set, and data.sources replaces data.path: give "
             "one of them (a mixture of one is data.path; add it to data.sources to mix it with the others)")
    seen: Dict[str, int] = {}
    for i, source in enumerate(data.sources):
        label = f"data.sources[{i}]"
        _require(source.path.strip() != "", f"{label}: path must name a directory written by `sparsemixer-ds "
                 f"prepare`; got {source.path!r}")
        name = source_name(source)
        _require(_SOURCE_NAME.fullmatch(name) is not None,
                 f"{label}: the name {name!r} (metrics and monitors use it) may hold only letters, digits and _.-; "
                 "give the source a name, e.g. name: web")
        _require(math.isfinite(source.weight) and source.weight > 0,
                 f"{label} ({name}): weight must be a positive number, its share of the training sequences relative "
                 f"to the other sources' weights; got {source.weight}")
        _require(name not in seen, f"data.sources[{seen.get(name)}] and {label} are both named {name!r}; give each "
                 "source a name of its own (name: ...)")
        seen[name] = i


def total_steps(cfg: RunConfig, world_size: int) -> int:
    """Optimizer steps of the run: train.steps, or the token budget over tokens per step."""
    if cfg.train.tokens > 0:
        per_step = cfg.train.micro_batch * cfg.train.grad_accum * world_size * cfg.model.seq_len
        return max(1, math.ceil(cfg.train.tokens / per_step))
    return cfg.train.steps


# The keys of a DeepSpeed JSON that the run config owns, and where they live there.
_OWNED_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
}


# The blocks of a DeepSpeed JSON that are read here, by the model families and by the trainer.
_BLOCKS = {"zero_optimization": '{"stage": 2}', "bf16": '{"enabled": true}', "fp16": '{"enabled": true}'}
PRECISIONS = ("bf16", "fp16")  # the mixed precisions a DeepSpeed JSON can enable; neither: fp32


@dataclass(frozen=True)
class DSSettings:
    """What this project reads of a DeepSpeed JSON, typed: the one place that probes the dict's blocks."""
    precision: str  # "bf16", "fp16" or "fp32" (neither enabled)
    zero_stage: int  # zero_optimization.stage, 0 without the block
    offloaded: Tuple[str, ...]  # what ZeRO offloads to the CPU or NVMe: "optimizer", "weights"
    micro_batch: int  # train_micro_batch_size_per_gpu (0 where unset: load_ds_config sets it)
    grad_accum: int  # gradient_accumulation_steps (1 where unset)

    @property
    def mixed(self) -> bool:
        """Mixed precision: bf16 or fp16 weights with fp32 master weights in the optimizer."""
        return self.precision != "fp32"

    @classmethod
    def of(cls, ds: dict) -> "DSSettings":
        zero = ds.get("zero_optimization", {})
        offloaded = tuple(part for part, key in (("optimizer", "offload_optimizer"), ("weights", "offload_param"))
                          if zero.get(key, {}).get("device", "none") in ("cpu", "nvme"))
        precision = next((key for key in PRECISIONS if ds.get(key, {}).get("enabled")), "fp32")
        return cls(precision, zero.get("stage", 0), offloaded, ds.get("train_micro_batch_size_per_gpu", 0),
                   ds.get("gradient_accumulation_steps", 1))


def load_ds_config(path: Path, cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON at ``path`` with the run config's batch settings filled in. What a model
    family needs of it (the ZeRO stages it works with, say) its ``ds_config`` checks and adds."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a JSON file" if path.is_dir() else "does not exist"
        raise ConfigError(f"DeepSpeed config {path} {what}; set ds_config to one of ds_configs/*.json")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must hold a JSON object of DeepSpeed settings")
    for block, example in _BLOCKS.items():
        if block in ds and not isinstance(ds[block], dict):
            raise ConfigError(f"{path}: '{block}' must be a JSON object of settings, e.g. \"{block}\": {example}; "
                              f"got {json.dumps(ds[block])}")
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{path}: '{key}' is {ds[key]!r} but the run config's {_OWNED_BATCH_KEYS[key]} is "
                              f"{value!r}; the run config owns it: remove '{key}' from the JSON or make them equal")
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != global_batch:
        raise ConfigError(f"{path}: 'train_batch_size' is {ds['train_batch_size']!r} but train.micro_batch x "
                          f"train.grad_accum x world size = {cfg.train.micro_batch} x {cfg.train.grad_accum} x "
                          f"{world_size} = {global_batch}; remove it from the JSON (the run config sets it)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: has an '{key}' block, but the run config owns the optimizer and the "
                              "learning-rate schedule (train.lr, train.warmup_steps, ...); remove it from the JSON")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: enables both fp16 and bf16; enable one of them")
    # DeepSpeed's own checks skip a step with non-finite gradients; these settings turn them off.
    for block, key in (("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")):
        if ds.get(block, {}).get(key) is False:
            raise ConfigError(f"{path}: '{block}.{key}' is false, which would apply steps whose gradients are "
                              "not finite; remove it (steps with non-finite loss or gradients are skipped and "
                              "counted, see train.max_skipped_steps)")
    ds.update(wanted)
    ds["train_batch_size"] = global_batch
    # The run config's AdamW is a client optimizer; ZeRO accepts it once told to.
    ds["zero_allow_untested_optimizer"] = True
    return ds


def config_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def config_from_dict(values: dict, source: str) -> RunConfig:
    """A RunConfig from a saved ``config_dict`` (a checkpoint's or an export's), checked like a file."""
    cfg = RunConfig()
    _apply(cfg, values, "", source)
    validate(cfg)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
