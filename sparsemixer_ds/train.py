"""The training loop: deepspeed.initialize, steps, evaluation, checkpoints, metrics.

Run under the ``deepspeed`` launcher (``sparsemixer-ds train`` on every rank). All randomness of a
step (its batches, routing draws, dropout) is a pure function of (seed, step, micro-step, rank), so
a resumed run repeats exactly what an uninterrupted one would have done, and nothing but the step
needs restoring besides DeepSpeed's own state.
"""
import json
import math
import os
import socket
import shutil
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

import deepspeed
import numpy as np
import psutil
import torch
import torch.nn.functional as F
import yaml
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.utils import ZeRORuntimeException
from tqdm import tqdm

from .comm import init_distributed
from .config import ConfigError, RunConfig, RunError, config_dict, dump_yaml, load_ds_config, total_steps
from .data import Batches, eval_batches, open_split
from .model import MoELM
from .moe import RouterMonitor, optimizer_param_groups

CHECKPOINTS = "checkpoints"
TAG_PREFIX = "step_"
COMPLETE = "COMPLETE"  # written into a tag's directory once every rank has saved its part


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite on every rank.

    It sets ``overflow``, the attribute DeepSpeed's engine reads after a step: a skipped step is
    counted in ``engine.skipped_steps``, ``engine.was_step_applied()`` is False and the LR schedule
    waits. Only ZeRO stage 0 in fp32 needs it: there the engine steps the client optimizer directly,
    while ZeRO 1/2 and DeepSpeed's bf16 and fp16 optimizers check their own gradient copies and do
    not call this step on a bad one.
    """
    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device(get_accelerator().current_device_name())
        bad = torch.zeros(1, device=device)
        if grads:
            bad[0] = float(not torch.stack([g.isfinite().all() for g in grads]).all())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips, or none
        self.overflow = bool(bad.item())
        if self.overflow:
            return None
        return super().step(closure)


EVAL_STREAM = 1 << 30  # the seed stream of evaluations, apart from every micro-step's


def step_seed(seed: int, step: int, stream: int, rank: int) -> int:
    """A seed for one micro-step (``stream`` = its index) or evaluation of one rank: independent
    streams, no call history involved."""
    return int(np.random.SeedSequence([seed, step, stream, rank]).generate_state(1)[0])


def warmup_cosine(cfg: RunConfig, total: int):
    """LR multiplier at an optimizer step: linear warm-up, then cosine down to min_lr_ratio."""
    warmup, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def checkpoint_tags(ckpt_dir: Path) -> List[str]:
    """Complete checkpoint tags, oldest first. A tag without its COMPLETE marker (a save that was
    interrupted) is never taken for a checkpoint."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE).is_file())


def read_data_meta(data_dir: Path) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"data.path={str(data_dir)!r} has no meta.json; prepare it first: "
                          f"sparsemixer-ds prepare --out {data_dir}")
    return json.loads(meta_path.read_text())


def resolve_vocab(cfg: RunConfig, meta: dict) -> None:
    """model.vocab_size 0 takes the data's; a set value must cover every token id in the data."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size < int(meta["vocab_size"]):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({meta['vocab_size']} in {cfg.data.path}/meta.json); set it to 0 to take the data's")


def check_token_ids(data_dir: Path, vocab_size: int) -> None:
    """Every token id in the data must be a row of the embedding (one pass over each memory map)."""
    for split in ("train", "val"):
        tokens = open_split(data_dir, split)
        if len(tokens) and int(tokens.data.max()) >= vocab_size:
            raise ConfigError(f"{tokens.path} holds token id {int(tokens.data.max())}, outside the vocabulary of "
                              f"{vocab_size}; the token file does not belong to this meta.json or "
                              "model.vocab_size is too small (prepare the data again, or set model.vocab_size=0)")


def fill_monitor_paths(ds_config: dict, run_dir: Path) -> None:
    """Monitors enabled in the DS JSON without an output path write into the run directory."""
    for name in ("tensorboard", "csv_monitor"):
        block = ds_config.get(name)
        if isinstance(block, dict) and block.get("enabled"):
            block.setdefault("output_path", str(run_dir / "monitor"))
            block.setdefault("job_name", "train")


class Metrics:
    """One JSON object per line in run_dir/metrics.jsonl, plus DeepSpeed's monitors; rank 0 only."""

    def __init__(self, path: Path, engine, enabled: bool) -> None:
        self.path, self.engine, self.enabled = path, engine, enabled

    def write(self, record: dict, events: List[tuple]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(events)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks of a float64 tensor."""
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def evaluate(engine, batches, cfg: RunConfig, step: int, rank: int) -> dict:
    """Validation loss (nats per token) and perplexity over every rank's validation batches."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    torch.manual_seed(step_seed(cfg.train.seed, step, EVAL_STREAM, rank))  # capacity-overflow choices may be random
    with torch.no_grad():
        for x, y in batches:
            logits = engine(x.to(engine.device)).logits
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.to(engine.device).flatten(), reduction="sum")
            totals[1] += y.numel()
    dist.all_reduce(totals)
    engine.train()
    loss = float(totals[0] / totals[1])
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# What fixes the shape of the weights: a checkpoint saved with other values cannot be loaded.
SHAPE_KEYS = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.seq_len",
              "model.positions", "model.ffn_hidden", "moe.router", "moe.num_experts", "moe.moe_every",
              "moe.expert_hidden")


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Optional[str]:
    """Refuse to overwrite a finished or running run, or to resume one of another model shape, or to
    write where nothing can be written; return the tag to resume from."""
    run_dir = Path(cfg.run_dir)
    tags = checkpoint_tags(run_dir / CHECKPOINTS)
    if resume and not tags:
        raise ConfigError(f"--resume: {run_dir / CHECKPOINTS} has no checkpoint to resume from; "
                          "start without --resume")
    if not resume and (tags or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(f"run_dir {run_dir} already holds a run; pass --resume to continue it, "
                          "or set run_dir to a new directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run_dir {run_dir}: {existing} is a file, not a directory; choose another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir}: {existing} is not writable; choose a run_dir you can write to")
    if not resume:
        return None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = config_dict(cfg)
    differ = [f"{key}: {_get(saved, key)!r} in the checkpoint, {_get(now, key)!r} now" for key in SHAPE_KEYS
              if _get(saved, key) != _get(now, key)]
    if differ:
        raise ConfigError(f"--resume: the checkpoints in {run_dir} are of another model shape ("
                          + "; ".join(differ) + "); resume with the run's own settings (its config.yaml)")
    return tags[-1]


def _get(values: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return values.get(section, {}).get(key)


class Plan(NamedTuple):
    """What pre-flight checks settled before any rank does work."""
    ds_config: dict
    resume_tag: Optional[str]


def preflight(cfg: RunConfig, world: int, resume: bool) -> Plan:
    """Every check that needs files but no processes: run by each rank before training, and by
    ``sparsemixer-ds check`` before a launch script starts any rank. Fills in model.vocab_size."""
    if world % cfg.moe.ep_size:
        raise ConfigError(f"world size {world} is not divisible by moe.ep_size={cfg.moe.ep_size}; "
                          f"launch a multiple of {cfg.moe.ep_size} processes or change moe.ep_size")
    ds_config = load_ds_config(Path(cfg.ds_config), cfg, world)
    data_dir = Path(cfg.data.path)
    resolve_vocab(cfg, read_data_meta(data_dir))
    check_token_ids(data_dir, cfg.model.vocab_size)
    # Building the loaders checks that the splits hold enough windows of model.seq_len tokens.
    Batches(open_split(data_dir, "train"), cfg.model.seq_len, cfg.train.micro_batch, 0, world, cfg.train.grad_accum,
            cfg.train.seed)
    eval_batches(open_split(data_dir, "val"), cfg.model.seq_len, cfg.eval.batch_size, 0, world, cfg.eval.batches)
    resume_tag = prepare_run_dir(cfg, resume)
    fill_monitor_paths(ds_config, Path(cfg.run_dir))
    return Plan(ds_config, resume_tag)


def discover_mpi() -> None:
    """Under mpirun, take rank, world size and local rank from mpi4py.

    DeepSpeed's own MPI discovery would do the same but points MASTER_ADDR at the first address of
    ``hostname -I``, which is wrong on multi-homed hosts; here MASTER_ADDR and MASTER_PORT come from
    the environment (launch/mpi.sh sets them), else rank 0's host name and 29500.
    """
    under_mpi = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if "RANK" in os.environ or not under_mpi:
        return
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = comm.bcast(os.environ.get("MASTER_ADDR") or socket.gethostname(), root=0)
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()), LOCAL_RANK=str(node.Get_rank()),
                      LOCAL_SIZE=str(node.Get_size()), MASTER_ADDR=master,
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train ``cfg`` on the ranks the launcher started; returns the final metrics (on every rank)."""
    discover_mpi()
    init_distributed(cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config, resume_tag = preflight(cfg, world, resume)
    t = cfg.train
    seq_len = cfg.model.seq_len
    data_dir = Path(cfg.data.path)
    batches = Batches(open_split(data_dir, "train"), seq_len, t.micro_batch, rank, world, t.grad_accum, t.seed)
    val_batches = eval_batches(open_split(data_dir, "val"), seq_len, cfg.eval.batch_size, rank, world,
                               cfg.eval.batches)
    run_dir = Path(cfg.run_dir)
    dist.barrier()  # every rank has checked its inputs before rank 0 writes anything
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    print(f"[rank {rank}/{world}] host {socket.gethostname()}, local rank {os.environ.get('LOCAL_RANK', '0')}, "
          f"expert-parallel group {rank // cfg.moe.ep_size} of size {cfg.moe.ep_size}", flush=True)

    total = total_steps(cfg, world)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = MoELM(cfg.model, cfg.moe)
    router_monitor = RouterMonitor(model)
    mixed = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
    stage0 = ds_config.get("zero_optimization", {}).get("stage", 0) == 0
    adamw = GuardedAdamW if stage0 and not mixed else torch.optim.AdamW
    optimizer = adamw(optimizer_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step = skipped = streak = 0  # steps skipped in all, and in a row now
    metrics = Metrics(run_dir / "metrics.jsonl", engine, rank == 0)
    if resume_tag is not None:
        start_step, skipped = restore_checkpoint(engine, scheduler, run_dir / CHECKPOINTS, resume_tag, rank)
        if rank == 0:
            remove_partial_checkpoints(run_dir / CHECKPOINTS)
        # The model as loaded, on this run's layout: comparable with the saved run's evaluation at this step.
        result = evaluate(engine, val_batches, cfg, start_step, rank)
        metrics.write({"step": start_step, "resumed": True, **result}, [])
    tokens_per_step = t.micro_batch * t.grad_accum * world * seq_len
    progress = tqdm(total=total, initial=start_step, disable=rank != 0 or not cfg.logging.progress,
                    file=sys.stderr, dynamic_ncols=True, desc="train")
    last = {"step": start_step}
    window_start, window_steps = time.perf_counter(), 0
    vocab = cfg.model.vocab_size
    for step in range(start_step, total):
        done = step + 1
        log_now = done % cfg.logging.interval == 0 or done == total
        router_monitor.active = log_now
        losses = torch.zeros(2, dtype=torch.float64, device=engine.device)
        for micro in range(t.grad_accum):
            x, y = batches.get(step, micro)
            torch.manual_seed(step_seed(t.seed, step, micro, rank))
            out = engine(x.to(engine.device))
            ce = F.cross_entropy(out.logits.float().view(-1, vocab), y.to(engine.device).view(-1))
            engine.backward(ce + cfg.moe.balance_coef * out.aux_loss)
            engine.step()
            losses += torch.stack([ce.detach(), out.aux_loss.detach()]).double()
        window_steps += 1
        # DeepSpeed (or GuardedAdamW) skipped the update if any rank's gradients were not finite.
        streak = 0 if engine.was_step_applied() else streak + 1
        skipped += streak > 0
        if log_now:
            mean = all_mean(losses / t.grad_accum)
            layers = [RouterMonitor.summarize(all_mean(s)) for s in router_monitor.collect()]
            elapsed = time.perf_counter() - window_start
            tok_s = tokens_per_step * window_steps / elapsed
            window_start, window_steps = time.perf_counter(), 0
            lr = engine.get_lr()[0]
            record = {"step": done, "tokens": done * tokens_per_step, "loss": finite_or_none(mean[0]),
                      "balance_loss": finite_or_none(mean[1]), "lr": lr, "skipped_steps": skipped,
                      "tokens_per_s": tok_s, "rss_mb": psutil.Process().memory_info().rss / 2**20, "layers": layers}
            events = [("Train/loss", float(mean[0]), done), ("Train/balance_loss", float(mean[1]), done),
                      ("Train/lr", lr, done), ("Train/tokens_per_s", tok_s, done),
                      ("Train/skipped_steps", skipped, done)]
            for i, layer in enumerate(layers):
                events += [(f"MoE/layer{i}/max_mean_load", layer["max_mean_load"], done),
                           (f"MoE/layer{i}/dropped", layer["dropped"], done),
                           (f"MoE/layer{i}/entropy", layer["entropy"], done)]
                events += [(f"MoE/layer{i}/load_expert{e}", v, done) for e, v in enumerate(layer["load"])]
            metrics.write(record, events)
            last.update(record)
            progress.set_postfix(loss=f"{float(mean[0]):.3f}", tok_s=f"{tok_s:,.0f}")
        paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
        if t.max_skipped_steps and streak >= t.max_skipped_steps:
            # Skipped steps changed nothing: the weights and optimizer state are the last good step's.
            save_checkpoint(engine, cfg, done, done * tokens_per_step, skipped, rank)
            metrics.write({"step": done, "skipped_steps": skipped, "stopped": "non-finite"}, [])
            raise RunError(f"steps {done - streak + 1}-{done} all had a non-finite loss or gradients and were "
                           f"skipped (train.max_skipped_steps={t.max_skipped_steps}); the last good state is saved "
                           f"as {run_dir / CHECKPOINTS / tag_name(done)}. Lower train.lr, raise "
                           "train.warmup_steps or set train.grad_clip, or check the data at these steps; "
                           "--resume continues after them")
        if done % cfg.eval.interval == 0 or done == total:
            result = evaluate(engine, val_batches, cfg, done, rank)
            metrics.write({"step": done, **result}, [("Eval/loss", result["val_loss"], done),
                                                     ("Eval/ppl", result["val_ppl"], done)])
            last.update(result)
            if rank == 0:
                progress.write(f"step {done}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}")
        interval = cfg.checkpoint.interval
        if (interval and done % interval == 0) or done == total:
            save_checkpoint(engine, cfg, done, done * tokens_per_step, skipped, rank)
        window_start += time.perf_counter() - paused
        progress.update(1)
        last["step"] = done
    progress.close()
    router_monitor.close()
    if rank == 0 and cfg.logging.plot:
        from .plots import plot_run  # matplotlib only where a plot is drawn
        plot_run(run_dir / "metrics.jsonl", run_dir / "training.png")
    dist.barrier()
    return last


def restore_checkpoint(engine, scheduler, ckpt_dir: Path, tag: str, rank: int) -> Tuple[int, int]:
    """Load a checkpoint into the engine; return its step and the steps skipped up to it.

    On the layout it was saved with, everything is restored. On another one (a different number of
    ranks or ep_size), DeepSpeed places every expert by its global index, but cannot re-partition
    ZeRO's optimizer state: then the weights are loaded, the optimizer starts afresh, and a warning
    says so. The LR schedule continues from where it was either way (it waits on skipped steps).
    """
    try:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        layout_error = None
    except ZeRORuntimeException as err:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True,
                                           load_optimizer_states=False, load_lr_scheduler_states=False)
        layout_error = err
    step, skipped = int(client["step"]), int(client.get("steps_skipped", 0))
    if layout_error is not None:
        for _ in range(step - skipped):
            scheduler.step()
        if rank == 0:
            print(f"WARNING: resuming {tag} on another layout: weights loaded, optimizer state reset "
                  f"(DeepSpeed: {layout_error})", file=sys.stderr, flush=True)
    return step, skipped


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Delete the tag directories of saves that never finished (they only take disk space)."""
    complete = set(checkpoint_tags(ckpt_dir))
    for path in sorted(ckpt_dir.glob(f"{TAG_PREFIX}*")):
        if path.is_dir() and path.name not in complete:
            print(f"removing {path}: an interrupted save (no {COMPLETE} marker)", file=sys.stderr, flush=True)
            shutil.rmtree(path)


def save_checkpoint(engine, cfg: RunConfig, step: int, tokens: int, skipped: int, rank: int) -> None:
    """Save through DeepSpeed (experts per expert), mark the tag complete once every rank's part is
    written, then keep only the newest ``checkpoint.keep``. A save that fails (a full disk) raises a
    RunError on the rank it failed on; the tag stays unmarked, so no resume takes it."""
    ckpt_dir = Path(cfg.run_dir) / CHECKPOINTS
    # Not "skipped_steps": DeepSpeed's own state has one, and load_checkpoint removes it from the client's.
    client = {"step": step, "tokens": tokens, "steps_skipped": skipped, "config": config_dict(cfg)}
    tag = tag_name(step)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        raise save_failed(ckpt_dir, tag, rank, err) from err
    dist.barrier()  # every rank's files are written
    if rank == 0:
        marker = ckpt_dir / tag / COMPLETE
        partial = marker.with_suffix(".tmp")
        try:
            partial.write_text(json.dumps({"step": step, "tokens": tokens}))
        except OSError as err:
            raise save_failed(ckpt_dir, tag, rank, err) from err
        partial.replace(marker)  # atomic: the tag is complete or it is not
        for old in checkpoint_tags(ckpt_dir)[:-cfg.checkpoint.keep]:
            shutil.rmtree(ckpt_dir / old)
    dist.barrier()


def save_failed(ckpt_dir: Path, tag: str, rank: int, err: Exception) -> RunError:
    saved = checkpoint_tags(ckpt_dir)
    free = shutil.disk_usage(ckpt_dir).free / 2**20
    return RunError(f"rank {rank} could not write checkpoint {ckpt_dir / tag} ({err}); {free:,.1f} MiB are free "
                    f"there. The checkpoints saved before are intact ({', '.join(saved) or 'none yet'}) and --resume "
                    "continues from the newest; free disk space, lower checkpoint.keep, or move run_dir to a "
                    "larger disk")


def finite_or_none(value) -> Optional[float]:
    """A metric for metrics.jsonl: JSON has no NaN or infinity."""
    value = float(value)
    return value if math.isfinite(value) else None


def summary(cfg: RunConfig, last: dict) -> str:
    run_dir = Path(cfg.run_dir)
    lines = [f"run directory: {run_dir}",
             f"checkpoints:   {run_dir / CHECKPOINTS} (latest: {checkpoint_tags(run_dir / CHECKPOINTS)[-1]})",
             f"metrics:       {run_dir / 'metrics.jsonl'}"]
    if cfg.logging.plot:
        lines.append(f"plot:          {run_dir / 'training.png'}")
    if "val_loss" in last:
        lines.append(f"final validation loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.2f} "
                     f"(step {last['step']}, {last.get('tokens_per_s', 0):,.0f} tokens/s)")
    return "\n".join(lines)
