"""Convert a model built with stock DeepSpeed MoE layers, then train it under deepspeed.initialize.

Started by the deepspeed launcher (see tests/test_distributed.py) with ep_size = world size and the
ZeRO stage-2 engine settings of ds_configs/cpu.json. Each rank writes what it observed.
"""
import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from models import TinyMoEModel

from sparsemixer_ds import SparseMixerMoE, convert
from sparsemixer_ds.run.comm import exit_rank, init_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--ds-config", type=Path, required=True)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial weights on every rank
model = TinyMoEModel(vocab=32, model_dim=16, num_experts=4, ep_size=world)
converted = convert(model, estimator="midpoint")
layers = [m for m in model.modules() if isinstance(m, SparseMixerMoE)]
router_grad_norms = []
for layer in layers:
    layer.gate.wg.weight.register_hook(lambda g: router_grad_norms.append(float(g.norm())))
omega_before = [layer.omega.detach().clone() for layer in layers]

# The project's CPU engine settings, plus the optimizer block an existing DeepSpeed set-up would carry.
config = json.loads(args.ds_config.read_text())
config.pop("csv_monitor", None)
config.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1, gradient_clipping=1.0,
              optimizer={"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95], "torch_adam": True}})
groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "params"})
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)

# A learnable toy language: the next token is (3 * token + 1) mod 32. Ranks see different batches.
data = torch.Generator().manual_seed(1 + rank)
losses = []
torch.manual_seed(50 + rank)  # routing draws
for step in range(args.steps):
    tokens = torch.randint(0, 32, (8, 16), generator=data)
    logits, aux = engine(tokens)
    loss = F.cross_entropy(logits.reshape(-1, 32), ((3 * tokens + 1) % 32).reshape(-1)) + 0.01 * aux
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))

result = {
    "converted": converted,
    "engine_has_moe_layers": bool(engine.has_moe_layers),
    "gate_classes": sorted({type(g).__name__ for g in engine.gate_modules}),
    "zero_stage": engine.zero_optimization_stage(),
    "losses": losses,
    "router_grad_norms": router_grad_norms,
    "omega_change": [float((layer.omega.detach().float() - before).abs().max())
                     for layer, before in zip(layers, omega_before)],
}
(args.out / f"rank{rank}.json").write_text(json.dumps(result))
exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
