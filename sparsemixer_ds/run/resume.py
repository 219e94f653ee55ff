"""The resume policy: what a resumed run may change, and how it is said.

The saved settings (the run's config.yaml) are authoritative. Another model shape, or any other setting that
fixes the trajectory, is refused, listing what differs; the run's length may change (the learning-rate schedule
is recomputed over it, and the message says what that does to the learning rate), and so may everything in
FREE_ON_RESUME. Where a checkpoint may load (its layout) is the model family's to say.
"""
from typing import List, Sequence

from ..config import ConfigError, RunConfig, config_dict, total_steps
from .checkpoints import tag_step
from .optim import warmup_cosine
from .rundir import RunDir

__all__ = ["resume_changes", "FREE_ON_RESUME", "LENGTH_KEYS"]

# What a resume may change besides the run's length (LENGTH_KEYS): where and how the run is watched,
# how long it waits, and its layout (a checkpoint restores onto another ep_size or world size). Every
# other setting fixes the trajectory, and the run's saved config holds it.
FREE_ON_RESUME = ("run_dir", "ds_config", "moe.ep_size", "eval.", "checkpoint.", "logging.", "train.max_skipped_steps",
                  "train.collective_timeout_s", "train.stop_grace_s")
LENGTH_KEYS = ("train.steps", "train.tokens")


def resume_changes(run: RunDir, cfg: RunConfig, shape_keys: Sequence[str], tag: str, world: int) -> List[str]:
    """Check ``cfg`` against the run's saved config (``run.config``) before resuming ``tag``; return what
    changes, said as it will happen. The saved settings are authoritative: another model shape
    (``shape_keys``) or any other setting that fixes the trajectory is refused, listing what differs.
    The run's length may change (the LR schedule is recomputed over it); so may everything in
    FREE_ON_RESUME. Writes nothing."""
    saved_cfg = run.saved_config()
    saved, now = _flat(config_dict(saved_cfg)), _flat(config_dict(cfg))
    keys = list(now) + [key for key in saved if key not in now]  # a free-form mapping (model.hf) may lose keys
    differ = [key for key in keys if key != "model.vocab_size" and saved.get(key) != now.get(key)]
    if saved["model.vocab_size"] and saved["model.vocab_size"] != now["model.vocab_size"]:
        differ.append("model.vocab_size")
    said = {key: f"{key}: {saved.get(key)!r} in the run, {now.get(key)!r} now" for key in differ}
    shape = [said[key] for key in differ if key in shape_keys or key.startswith(tuple(f"{k}." for k in shape_keys))]
    if shape:
        raise ConfigError(f"--resume: the checkpoints in {run.path} are of another model shape ("
                          + "; ".join(shape) + "); resume with the run's own settings (its config.yaml)")
    fixed = [said[key] for key in differ if key not in LENGTH_KEYS and not key.startswith(FREE_ON_RESUME)]
    if fixed:
        raise ConfigError(f"--resume: {run.config} fixes these settings for the run, and they differ ("
                          + "; ".join(fixed) + "). Resume with the run's own values (drop these --set or "
                          "config changes), or start a new run with another run_dir")
    step = tag_step(tag)
    old_total, new_total = total_steps(saved_cfg, world), total_steps(cfg, world)
    changes = [f"{said[key]}: applied" for key in differ if key not in LENGTH_KEYS]
    if old_total != new_total:
        if new_total <= step:
            raise ConfigError(f"--resume: {tag} is at step {step}, and the run would now end at step {new_total} "
                              f"({'; '.join(said[key] for key in differ if key in LENGTH_KEYS)}); ask for more "
                              "steps than the checkpoint has, or export it as it is")
        lr = [cfg.train.lr * warmup_cosine(c, total)(step)
              for c, total in ((saved_cfg, old_total), (cfg, new_total))]
        changes.append(f"the run's length changes from {old_total} to {new_total} steps "
                       f"({'; '.join(said[key] for key in differ if key in LENGTH_KEYS)}): the learning-rate "
                       f"schedule (warm-up, then cosine to the end) is recomputed over {new_total} steps, so from "
                       f"step {step} on the learning rate is {lr[1]:.4g} where it would have been {lr[0]:.4g}")
    return changes


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
