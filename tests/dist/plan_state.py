"""One rank's training state as DeepSpeed holds it, for tests/test_plan.py: the bytes of the module's
parameters, of their gradients after a backward (ZeRO 0), of the optimizer's fp32 partitions (ZeRO 1-2)
and of AdamW's moments after a step. Writes rank{R}.json to --out."""
import argparse
import json
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm as dist

from sparsemixer_ds.run.comm import exit_rank
from sparsemixer_ds.config import load_config
from sparsemixer_ds.models.families import get_family
from sparsemixer_ds.run.optim import make_adamw


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config")
    parser.add_argument("--ds", required=True)
    parser.add_argument("--set", action="append", default=[])
    args, _ = parser.parse_known_args()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    ds = json.loads(Path(args.ds).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = 1
    family = get_family(cfg)
    ds.update(family.ds_config(cfg, ds, args.ds))
    torch.manual_seed(0)
    model = family.build(cfg)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds,
                                                   optimizer=lambda _p: make_adamw(model, cfg, guarded=False))
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.model.seq_len))
    engine.backward(engine(x, x).loss)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    grads = nbytes(p.grad for p in engine.module.parameters() if p.grad is not None) if stage == 0 else None
    engine.step()
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = nbytes(v for state in inner.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    masters = nbytes(getattr(optimizer, "single_partition_of_fp32_groups", []))
    result = {"weights": nbytes(engine.module.parameters()), "gradients": grads, "optimizer": moments + masters}
    (Path(args.out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
