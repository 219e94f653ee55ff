"""The training loop: check, build, restore, then per step train, log, evaluate, save.

Run under a launcher (``sparsemixer-ds train`` on every rank). All randomness of a step (its batches,
routing draws, dropout) is a pure function of (seed, step, micro-step, rank), so a resumed run repeats
exactly what an uninterrupted one would have done, and nothing but the step needs restoring besides
DeepSpeed's own state. The parts each live in a module of their own: the model (models/families.py), the
optimizer and its schedule (run/optim.py), the run directory (run/rundir.py), its checkpoints
(run/checkpoints.py) and what a resume may change (run/resume.py), metrics (run/metrics.py), the process
group (run/comm.py), the data and its checks (data/loader.py, data/prepared.py).
"""
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import deepspeed
import numpy as np
import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from .config import ConfigError, DSSettings, RunConfig, RunError, config_dict, load_ds_config, total_steps
from .data.loader import Mixture, check_sources, data_sources, validation_sets
from .data.prepared import open_split
from .models.families import InitSource, get_family
from .models.flops import peak_flops
from .run.comm import discover_mpi, init_distributed
from .run.machine import check_memory, check_precision
from .run.metrics import Metrics, Throughput, Utilisation, all_mean
from .run.optim import apply_schedule, make_adamw, make_schedule
from .run.checkpoints import TagState, tag_name
from .run.resume import resume_changes
from .run.rundir import RunDir
from .run.runlock import RunLock, check_lock, launch_token
from .run.stop import Stopped, StopRequest
from .run.watchdog import Watchdog

EVAL_STREAM = 1 << 30  # the seed stream of evaluations, apart from every micro-step's


def step_seed(seed: int, step: int, stream: int, rank: int) -> int:
    """A seed for one micro-step (``stream`` = its index) or evaluation of one rank: independent
    streams, no call history involved."""
    return int(np.random.SeedSequence([seed, step, stream, rank]).generate_state(1)[0])


Batch = Tuple[torch.Tensor, torch.Tensor]


class ValidationSets(NamedTuple):
    """Each source's validation batches (by name) and its weight in the overall validation loss."""
    batches: Dict[str, List[Batch]]
    weights: Dict[str, float]  # normalised
    by_source: bool  # report each source's loss too (data.sources)


def loaders(cfg: RunConfig, rank: int, world: int) -> Tuple[Mixture, ValidationSets]:
    """This rank's training batches and validation batches; building them checks that both splits of
    every source hold enough windows of model.seq_len tokens."""
    t, seq_len, sources = cfg.train, cfg.model.seq_len, data_sources(cfg)
    try:
        train_files = [open_split(source.path, "train") for source in sources]
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{sources[0].label if len(sources) == 1 else 'data.sources'}: {err}") from None
    batches = Mixture(train_files, [source.weight for source in sources], seq_len, t.micro_batch, rank, world,
                      t.grad_accum, t.seed, [source.name for source in sources])
    total = sum(source.weight for source in sources)
    val = ValidationSets(validation_sets(sources, seq_len, cfg.eval.batch_size, rank, world, cfg.eval.batches),
                         {source.name: source.weight / total for source in sources}, bool(cfg.data.sources))
    return batches, val


def evaluate(model, val: Union[ValidationSets, List[Batch]], seed: int, step: int, rank: int,
             device: torch.device) -> dict:
    """Validation loss (nats per token) and perplexity of ``model`` (an engine or a bare model) over
    the validation batches of every rank of the process group, or of this process when there is none.
    ``val``: batches, or each source's (``loaders``); the overall loss of several sources is their
    losses' mean weighted as the training mixture is, and each source's is reported too."""
    if not isinstance(val, ValidationSets):
        val = ValidationSets({"data": val}, {"data": 1.0}, False)
    model.eval()
    totals = torch.zeros(len(val.batches), 2, dtype=torch.float64, device=device)
    torch.manual_seed(step_seed(seed, step, EVAL_STREAM, rank))  # capacity-overflow choices may be random
    with torch.no_grad():
        for s, batches in enumerate(val.batches.values()):
            for x, y in batches:
                logits = model(x.to(device)).logits
                totals[s, 0] += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
                totals[s, 1] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    losses = {name: float(totals[s, 0] / totals[s, 1]) for s, name in enumerate(val.batches)}
    loss = sum(val.weights[name] * value for name, value in losses.items())
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if val.by_source:
        result["val_loss_by_source"] = losses
    return result


class Preflight(NamedTuple):
    """What pre-flight checks settled before any rank does work."""
    ds_config: dict
    resume_tag: Optional[str]
    checkpoints: Tuple[TagState, ...] = ()  # the tags verified to choose resume_tag
    changes: Tuple[str, ...] = ()  # the settings a resume changes, said as they happen
    init_from: Optional[InitSource] = None  # --init-from: the HF checkpoint the weights start from


def preflight(cfg: RunConfig, world: int, resume: Union[bool, str], init_from: Optional[str] = None) -> Preflight:
    """Every check that needs files but no processes: run by each rank before training, and by
    ``sparsemixer-ds check`` before a launch script starts any rank. Fills in model.vocab_size.
    ``resume``: False, True (the newest intact checkpoint) or a tag (exactly that one, --resume-tag);
    the checkpoint is verified here, and what was passed over is said once (rank 0, or check).
    ``init_from``: a Hugging Face model directory to take the weights from (sparsemixer_ds.models.hf_checkpoint)."""
    family = get_family(cfg)
    if world % cfg.moe.ep_size:
        raise ConfigError(f"world size {world} is not divisible by moe.ep_size={cfg.moe.ep_size}; "
                          f"launch a multiple of {cfg.moe.ep_size} processes or change moe.ep_size")
    ds_config = load_ds_config(Path(cfg.ds_config), cfg, world)
    ds_config.update(family.ds_config(cfg, ds_config, cfg.ds_config))
    check_precision(ds_config, cfg.ds_config)
    family.check_routing(cfg, torch.device(get_accelerator().device_name()))
    cfg.model.vocab_size = check_sources(cfg)
    source = family.check_init_from(cfg, init_from, resume) if init_from is not None else None
    if source is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        for line in source.notes:
            print(f"--init-from: {line}", file=sys.stderr, flush=True)
    check_memory(family.memory_estimate(cfg, ds_config, world), world, cfg.moe.ep_size, cfg.ds_config)
    loaders(cfg, 0, world)
    check_lock(cfg.run_dir, launch_token())  # before the run directory's state: a running run writes it
    run = RunDir(cfg.run_dir)
    resume_tag = run.check(resume)
    changes = resume_changes(run, cfg, family.shape_keys, resume_tag, world) if resume_tag is not None else []
    if resume_tag is not None:
        family.check_resume(run.checkpoints / resume_tag, run.saved_config(), cfg, ds_config, world)
    if resume_tag is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        for line in run.store.notes(resume_tag) + [f"--resume: {change}" for change in changes]:
            print(line, file=sys.stderr, flush=True)
    run.fill_monitor_paths(ds_config)
    return Preflight(ds_config, resume_tag, tuple(run.store.verified.values()), tuple(changes), source)


class Trainer:
    """One run on this rank: its data, model and DeepSpeed engine, run directory and metrics, and the
    steps of the loop in ``train``."""

    def __init__(self, cfg: RunConfig, checked: Preflight) -> None:
        self.cfg, t = cfg, cfg.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batches, self.val_batches = loaders(cfg, self.rank, self.world)
        self.run = RunDir(cfg.run_dir)
        dist.barrier()  # every rank has checked its inputs before rank 0 writes anything
        # MFU's denominator: measured by every rank at once (CPU ranks share the cores, as in training).
        self.cost = get_family(cfg).cost(cfg)
        device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
        self.peak = peak_flops(cfg, checked.ds_config, device)
        if self.rank == 0:
            self.run.write_configs(cfg, checked.ds_config, {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "world_size": self.world,
                "resumed_from": checked.resume_tag, "changes": list(checked.changes),
                "init_from": checked.init_from and checked.init_from.path, "flops_per_token": self.cost.flops_per_token,
                "peak_tflops": self.peak.flops / 1e12, "peak": self.peak.source})
        print(f"[rank {self.rank}/{self.world}] host {socket.gethostname()}, local rank "
              f"{os.environ.get('LOCAL_RANK', '0')}, expert-parallel group {self.rank // cfg.moe.ep_size} of size "
              f"{cfg.moe.ep_size}", flush=True)

        self.total = total_steps(cfg, self.world)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        family = get_family(cfg)
        model = family.build(cfg)
        self.init_from = checked.init_from
        if self.init_from is not None:  # before deepspeed.initialize: AutoEP repacks the loaded experts
            family.load_init_weights(model, self.init_from)
        ds = checked.ds_config
        settings = DSSettings.of(ds)
        plain = settings.zero_stage == 0 and not settings.mixed
        # Given as callables, which DeepSpeed calls after AutoEP (family hf) has replaced the MoE blocks:
        # the groups then hold the parameters the model trains, AutoEP's experts in groups of their own.
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, config=ds, optimizer=lambda _params: make_adamw(model, cfg, guarded=plain),
            lr_scheduler=lambda optimizer: make_schedule(optimizer, cfg, self.total))
        if t.compile:
            # torch.compile with the accelerator's backend (inductor), after AutoEP (hf) has put its layers in: the
            # whole native model (DeepSpeed's MoE layer breaks the graph once per MoE block: sharded_moe.py,
            # C = int(C)), or each hf decoder layer around its eager AutoEP layer (the family's DS JSON sets
            # compile.autoep_non_moe). The first steps compile. Compiled parts draw their random numbers from
            # inductor's generator: the same distributions as eager, other numbers.
            self.engine.compile()
        self.device = self.engine.device
        self.routing = model.routing_stats()
        self.metrics = Metrics(self.run.metrics, self.engine.monitor, self.rank == 0,
                               Utilisation(self.cost.flops_per_token, self.peak.flops, self.world))
        self.tokens_per_step = t.micro_batch * t.grad_accum * self.world * cfg.model.seq_len
        self.throughput = Throughput(self.tokens_per_step)
        self.skipped = self.streak = 0  # steps skipped in all, and in a row now
        self.last: dict = {}
        self.progress: Optional[tqdm] = None

    def due(self, interval: int, done: int) -> bool:
        """Whether something that happens every ``interval`` steps (0: never) and at the end is due."""
        return done == self.total or (interval > 0 and done % interval == 0)

    def begin(self, resume_tag: Optional[str]) -> int:
        """Restore the checkpoint to resume from, if any; return the first step to run."""
        start = 0
        if resume_tag is not None:
            start, self.skipped = self.run.store.restore(self.engine, self.scheduler, resume_tag, self.rank)
            apply_schedule(self.scheduler)  # this run's schedule, should its length have changed
            if self.rank == 0:
                self.run.store.remove_partial_checkpoints()
                self.run.store.set_aside_newer(resume_tag)
            # The model as loaded, on this run's layout: comparable with the saved run's evaluation at this step.
            result = evaluate(self.engine, self.val_batches, self.cfg.train.seed, start, self.rank, self.device)
            self.metrics.write({"step": start, "resumed": True, **result})
        elif self.init_from is not None:
            # The checkpoint as this run computes it, before any step: comparable with its own evaluation.
            result = evaluate(self.engine, self.val_batches, self.cfg.train.seed, 0, self.rank, self.device)
            self.metrics.write({"step": 0, "init_from": self.init_from.path, **result})
        self.last = {"step": start}
        self.progress = tqdm(total=self.total, initial=start, disable=self.rank != 0 or not self.cfg.logging.progress,
                             file=sys.stderr, dynamic_ncols=True, desc="train")
        return start

    def train_step(self, step: int, record_routing: bool) -> torch.Tensor:
        """One optimizer step of ``train.grad_accum`` micro-steps; returns this rank's [ce, balance, z-loss],
        averaged over them."""
        t = self.cfg.train
        for stats in self.routing:
            stats.recording = record_routing
        losses = torch.zeros(3, dtype=torch.float64, device=self.device)
        for micro in range(t.grad_accum):
            x, y = self.batches.get(step, micro)
            torch.manual_seed(step_seed(t.seed, step, micro, self.rank))
            out = self.engine(x.to(self.device), y.to(self.device))
            self.engine.backward(out.loss)
            self.engine.step()
            losses += torch.stack([out.ce, out.balance_loss, out.z_loss]).double()
        # DeepSpeed (or GuardedAdamW) skipped the update if any rank's gradients were not finite.
        self.streak = 0 if self.engine.was_step_applied() else self.streak + 1
        self.skipped += self.streak > 0
        self.throughput.step()
        if self.cfg.data.sources:
            self.note_epochs(step + 1)  # before a stop or checkpoint of this step can end the process
        return losses / t.grad_accum

    def log(self, done: int, losses: torch.Tensor) -> None:
        """One metrics record: losses averaged over the ranks, routing statistics since the last one."""
        mean = all_mean(losses)
        routing = [all_mean(stats.take(self.device)) for stats in self.routing]
        tokens_per_s = self.throughput.read()
        record = self.metrics.training(done, done * self.tokens_per_step, mean, self.engine.get_lr()[0],
                                       self.skipped, tokens_per_s, routing,
                                       self.batches.seen(done) if self.cfg.data.sources else None)
        self.last.update(record)
        self.progress.set_postfix(loss=f"{float(mean[0]):.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def stop_if_failing(self, done: int) -> None:
        """After train.max_skipped_steps non-finite steps in a row: save the last good state and stop."""
        limit = self.cfg.train.max_skipped_steps
        if not limit or self.streak < limit:
            return
        # Skipped steps changed nothing: the weights and optimizer state are the last good step's.
        self.save(done)
        self.metrics.write({"step": done, "skipped_steps": self.skipped, "stopped": "non-finite"})
        raise RunError(f"steps {done - self.streak + 1}-{done} all had a non-finite loss or gradients and were "
                       f"skipped (train.max_skipped_steps={limit}); the last good state is saved as "
                       f"{self.run.checkpoints / tag_name(done)}. Lower train.lr, raise train.warmup_steps or "
                       "set train.grad_clip, or check the data at these steps; --resume continues after them")

    def stop(self, done: int, request: StopRequest) -> None:
        """A stop was asked for: save this step (all ranks are at it) and stop with the signal's code."""
        tags = self.run.store.tags()
        request.deadline_note = (f"; --resume continues from {self.run.checkpoints / tags[-1]}" if tags else
                                 "; there is no checkpoint yet: start again without --resume")
        self.progress.close()
        self.save(done)
        self.metrics.write({"step": done, "stopped": request.reason})
        if self.rank == 0:
            sys.stderr.write(f"sparsemixer-ds train: stopped: at step {done} on request ({request.reason}); saved "
                             f"{self.run.checkpoints / tag_name(done)}. Continue with the same command plus --resume\n")
            sys.stderr.flush()
        dist.barrier()  # the message is out before any rank exits: a launcher may end the others then
        raise Stopped("", 128 + request.signum)

    def validate(self, done: int) -> None:
        result = evaluate(self.engine, self.val_batches, self.cfg.train.seed, done, self.rank, self.device)
        self.metrics.evaluation(done, result)
        self.last.update(result)
        if self.rank == 0:
            self.progress.write(f"step {done}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}")

    def save(self, done: int) -> None:
        self.run.store.save(self.engine, done, done * self.tokens_per_step, self.skipped, config_dict(self.cfg),
                            self.cfg.checkpoint.keep, self.rank)

    def end_step(self, done: int) -> None:
        self.progress.update(1)
        self.last["step"] = done

    def note_epochs(self, done: int) -> None:
        """Say (and record) each source that ran out of windows in this step and wrapped around."""
        before = self.batches.seen(done - 1)
        for name, now in self.batches.seen(done).items():
            if int(now["epochs"]) > int(before[name]["epochs"]):
                self.metrics.write({"step": done, "source": name, "epoch": int(now["epochs"]) + 1})
                if self.rank == 0:
                    self.progress.write(f"step {done}: data source {name!r} ran out and wrapped around: epoch "
                                        f"{int(now['epochs']) + 1} of it begins")

    def finish(self) -> dict:
        self.progress.close()
        if self.rank == 0 and self.cfg.logging.plot:
            from .run.plots import plot_run  # matplotlib only where a plot is drawn
            plot_run(self.run.metrics, self.run.plot)
        dist.barrier()
        return self.last


def train(cfg: RunConfig, resume: Union[bool, str] = False, init_from: Optional[str] = None) -> dict:
    """Train ``cfg`` on the ranks the launcher started, from ``init_from``'s weights if given (a Hugging
    Face model directory); returns the final metrics (on every rank)."""
    discover_mpi()
    init_distributed(cfg.train.collective_timeout_s)
    watchdog = Watchdog.start(cfg.train.collective_timeout_s)  # a stalled rank ends the job, named
    request = StopRequest(cfg.train.stop_grace_s, dist.get_rank())
    lock = RunLock(cfg.run_dir, launch_token(), "rank 0 of sparsemixer-ds train")
    try:
        checked = preflight(cfg, dist.get_world_size(), resume, init_from)
        if dist.get_rank() == 0:
            lock.acquire().keep_fresh()  # the launch script's lock passes to the run, or a bare launch takes it
        trainer = Trainer(cfg, checked)
        for step in range(trainer.begin(checked.resume_tag), trainer.total):
            done = step + 1
            watchdog.mark(done, "train step")
            log_now = trainer.due(cfg.logging.interval, done)
            losses = trainer.train_step(step, record_routing=log_now)
            if log_now:
                trainer.log(done, losses)
            with trainer.throughput.paused():  # evaluation and checkpoints do not count against tokens/s
                if request.agreed(trainer.device):
                    trainer.stop(done, request)
                trainer.stop_if_failing(done)
                if trainer.due(cfg.eval.interval, done):
                    watchdog.mark(done, "evaluation")
                    trainer.validate(done)
                if trainer.due(cfg.checkpoint.interval, done):
                    watchdog.mark(done, "checkpoint save")
                    trainer.save(done)
            trainer.end_step(done)
        watchdog.mark(trainer.total, "finish")
        return trainer.finish()
    finally:
        request.close()
        lock.release()
        watchdog.stop()


def summary(cfg: RunConfig, last: dict) -> str:
    run = RunDir(cfg.run_dir)
    lines = [f"run directory: {run.path}",
             f"checkpoints:   {run.checkpoints} (latest: {run.store.tags()[-1]})",
             f"metrics:       {run.metrics}"]
    if cfg.logging.plot:
        lines.append(f"plot:          {run.plot}")
    if "val_loss" in last:
        lines.append(f"final validation loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.2f} "
                     f"(step {last['step']}, {last.get('tokens_per_s', 0):,.0f} tokens/s)")
    if "tokens_by_source" in last:
        lines.append("tokens per source: " + ", ".join(
            f"{name} {tokens:,} ({last['epochs_by_source'][name]:.3g} epochs)"
            for name, tokens in last["tokens_by_source"].items()))
    if "val_loss_by_source" in last:
        lines.append("validation loss per source: " + ", ".join(
            f"{name} {loss:.4f}" for name, loss in last["val_loss_by_source"].items()))
    if "mfu" in last:
        lines.append(f"model FLOPs utilisation {last['mfu']:.1%} ({last['model_tflops']:.3g} TFLOP/s per rank; "
                     f"against the peak recorded with the start in {run.starts})")
    return "\n".join(lines)
