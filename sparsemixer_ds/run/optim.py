"""The optimizer side of training: AdamW that skips non-finite steps, its parameter groups, and the
learning-rate schedule (linear warm-up, then cosine)."""
import math
from typing import Callable, List, Tuple

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from ..config import RunConfig

__all__ = ["GuardedAdamW", "optimizer_param_groups", "warmup_cosine", "make_adamw", "make_schedule", "build_optimizer"]


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


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: decay on matrices only (not norms, biases or omega), and expert parameters in
    groups of their own, which DeepSpeed's MoE needs to reduce them over the expert-data-parallel group."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def warmup_cosine(cfg: RunConfig, total: int) -> Callable[[int], float]:
    """LR multiplier at an optimizer step: linear warm-up, then cosine down to min_lr_ratio."""
    warmup, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_adamw(model: nn.Module, cfg: RunConfig, guarded: bool) -> torch.optim.AdamW:
    """The run config's AdamW over ``model``'s parameters as they are now. ``guarded``: a
    GuardedAdamW, for an engine that steps the optimizer without checking the gradients itself."""
    t = cfg.train
    adamw = GuardedAdamW if guarded else torch.optim.AdamW
    return adamw(optimizer_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run config's learning-rate schedule over ``total`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total))


def build_optimizer(model: nn.Module, cfg: RunConfig, total: int,
                    guarded: bool) -> Tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``make_adamw`` and its ``make_schedule``."""
    optimizer = make_adamw(model, cfg, guarded)
    return optimizer, make_schedule(optimizer, cfg, total)


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each parameter group's learning rate to ``scheduler``'s value at the step it is at: after a
    checkpoint restored the optimizer's last rate, which came from the run's schedule at saving time."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
