"""What this machine offers a run, checked before any rank does work: the precisions its DeepSpeed
accelerator can train in, and the memory a rank can hold.

Both are questions to DeepSpeed's accelerator (``deepspeed.accelerator.get_accelerator()``), the same
object DeepSpeed asks once the ranks have started, so the answer here is the answer there.
"""
import os

from deepspeed.accelerator import get_accelerator

from ..config import PRECISIONS, ConfigError, DSSettings
from ..models.families import MemoryEstimate

__all__ = ["check_precision", "rank_memory", "check_memory"]

GiB = 1024**3


def check_precision(ds: dict, source: str) -> None:
    """Refuse bf16 or fp16 enabled in the DS JSON (read from ``source``) when the accelerator cannot
    train in it: DeepSpeed would refuse it too, but only in ``deepspeed.initialize``, after every rank
    has started."""
    accelerator = get_accelerator()
    supported = {"bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported(), "fp32": True}
    key = DSSettings.of(ds).precision
    if not supported[key]:
        usable = [other for other in PRECISIONS if supported[other]]
        alternative = f"enable {usable[0]} instead or " if usable else ""
        raise ConfigError(f"{source}: '{key}.enabled' is true, but DeepSpeed's {accelerator.device_name()} "
                          f"accelerator cannot train in {key} on this machine; {alternative}remove the '{key}' "
                          f"block (fp32), or run on a machine whose accelerator supports {key}")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def rank_memory(world: int) -> tuple:
    """(bytes one rank can use, a sentence saying where that number comes from). A GPU rank has its
    device's memory; CPU ranks share the machine's available memory (MemAvailable) with the other
    ranks on it: LOCAL_SIZE of them under a launcher (deepspeed's and launch/mpi.sh set it), else all
    ``world`` (what `sparsemixer-ds check` assumes)."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        ranks = int(os.environ.get("LOCAL_SIZE", world))
        available = accelerator.available_memory()
        return available // ranks, (f"this machine has {_gib(available)} available, {_gib(available // ranks)} for "
                                    f"each of its {ranks} rank(s)")
    total = accelerator.total_memory()
    return total, f"each rank has {_gib(total)} of {accelerator.device_name()} memory"


def check_memory(estimate: MemoryEstimate, world: int, ep_size: int, source: str) -> None:
    """Refuse a model whose training state per rank (``estimate``) exceeds the memory a rank has: it is
    clearly too big, since activations come on top. ``source`` names the DS JSON (its ZeRO stage)."""
    available, where = rank_memory(world)
    if estimate.total <= available:
        return
    zero = " or ZeRO stage 2 (shards gradients and optimizer state)" if estimate.zero_stage < 2 else ""
    raise ConfigError(
        f"the model does not fit: about {_gib(estimate.total)} per rank before activations (weights "
        f"{_gib(estimate.weights)} + gradients {_gib(estimate.gradients)} + AdamW state {_gib(estimate.optimizer)} "
        f"for {estimate.params:,} parameters on each rank, {estimate.expert_params:,} of them in its experts; ZeRO "
        f"stage {estimate.zero_stage} in {source}), but {where}; use a smaller model (model.d_model, model.n_layers, "
        f"moe.expert_hidden, moe.num_experts), more ranks with a larger moe.ep_size (now {ep_size}: each rank holds "
        f"num_experts / ep_size experts){zero}")
