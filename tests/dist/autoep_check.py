"""Hugging Face MoE models under DeepSpeed's AutoEP (autoep_size 2) with SparseMixer routers, on 2 ranks.

Started by the deepspeed launcher (see tests/test_autoep.py) with ``--stage 2`` or ``--stage 3`` (ZeRO).
deepspeed.initialize works several times in one process, and a launch costs more than an engine, so one
launch builds several engines in turn. Rank 0 writes each model's config and initial weights
(``<name>.json``, ``<name>_init.pt``); every rank writes ``rank{R}.pt``, a dict from engine name to what
it observed, which the test compares with one-process references:

- every engine: the logits in eval mode of this rank's batch;
- PhiMoE engines: for the first router call of a training step, its logits, draws, weights, the upstream
  gradient of the weights and the gradient that reached the logits, and the unweighted balance loss;
  the omega parameters (midpoint) before and after the steps, and whether the optimizer holds them;
- ``resume`` (stage 3): the losses of M steps after a checkpoint, from the engine that saved it and from a
  fresh engine of other initial weights that loaded it.
"""
import argparse
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from transformers import AutoModelForCausalLM, MixtralConfig, PhimoeConfig, Qwen3MoeConfig

from sparsemixer_ds.models import autoep
from sparsemixer_ds.run.comm import exit_rank, init_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

VOCAB, BATCH, SEQ = 64, 2, 16
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
CONFIGS = {
    # router_jitter_noise is PhiMoE's jitter mask: 0.3 leaves several experts in the race for most tokens.
    "phimoe": PhimoeConfig(num_local_experts=4, router_jitter_noise=0.3, **SMALL),
    # Mixtral's router_jitter_noise is input jitter (the router's option input_jitter), not a jitter mask.
    "mixtral": MixtralConfig(num_local_experts=4, router_jitter_noise=0.05, **SMALL),
    "qwen3_moe": Qwen3MoeConfig(num_experts=4, moe_intermediate_size=64, norm_topk_prob=False, **SMALL),
}
# PhiMoE has no AutoEP preset: the custom-preset keys name its block, router and expert weights.
PHIMOE_KEYS = {"moe_layer_pattern": r"model\.layers\.\d+\.mlp", "router_pattern": "router",
               "expert_pattern": "experts", "expert_w1": "gate_up_proj", "expert_w2": "down_proj",
               "expert_w3": None, "score_func": "softmax"}


def ds_config(family: str, **expert_parallel) -> dict:
    keys = PHIMOE_KEYS if family == "phimoe" else {"preset_model": family}
    return {"train_micro_batch_size_per_gpu": BATCH,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": args.stage},
            "expert_parallel": {"enabled": True, "autoep_size": 2, **keys, **expert_parallel}}


def build(family: str, seed: int = 0):
    """The tiny model with the same weights on every rank; routers scaled up so logits spread over ~1."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.router.weight", "mlp.gate.weight")):
                p.mul_(10.0)
    if seed == 0 and rank == 0:
        (args.out / f"{family}.json").write_text(model.config.to_json_string())
        torch.save(model.state_dict(), args.out / f"{family}_init.pt")
    return model


def engine_for(model, config: dict):
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def batch(step: int) -> torch.Tensor:
    """This rank's tokens for a step: the ranks' batches differ (step -1: the eval batch)."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 * rank + step + 1))


def eval_logits(engine) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch(-1)).logits.detach().clone()
    engine.train()
    return logits


def train_step(engine, step: int) -> float:
    torch.manual_seed(100 * step + rank)  # the routing draws
    tokens = batch(step)
    logits = engine(input_ids=tokens).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
    loss = loss + autoep.aux_loss(engine.module)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def gathered(param) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def omegas(engine) -> dict:
    return {name: gathered(p) for name, p in engine.module.named_parameters() if name.endswith("_omega.omega")}


def capture_router_call(router, seen: dict):
    """Hooks that keep, for the router's next call, its logits, draws, weights and their gradients."""
    def on_logits(_gate, _args, logits):
        if "logits" not in seen:
            seen["logits"] = logits.detach().clone()
            logits.register_hook(lambda g: seen.setdefault("grad_logits", g.detach().clone()))

    def on_route(module, _args, output):
        if "experts" not in seen:
            weights, experts, _counts = output
            seen.update(experts=experts.detach().clone(), weights=weights.detach().clone(),
                        balance=module.terms.balance.clone())
            weights.register_hook(lambda g: seen.setdefault("grad_weights", g.detach().clone()))

    return [router.gate.register_forward_hook(on_logits), router.register_forward_hook(on_route)]


def in_optimizer(engine, param) -> bool:
    groups = getattr(engine.optimizer, "bit16_groups", None) or engine.optimizer.fp16_groups  # ZeRO-2 | ZeRO-3
    return any(p is param for group in groups for p in group)


def phimoe_run(grouped_mm: bool, estimator: str, balance: str) -> dict:
    model = build("phimoe")
    config = ds_config("phimoe", use_grouped_mm=grouped_mm)
    blocks = autoep.use_sparsemixer(model, config, estimator=estimator, balance=balance)
    engine = engine_for(model, config)
    result = {"blocks": blocks, "eval_tokens": batch(-1), "eval_logits": eval_logits(engine)}
    # The routers went in at that first forward.
    result["routers"] = [type(r).__name__ for r in autoep.routers(engine.module)]
    result["options"] = [dict(vars(r.options)) for r in autoep.routers(engine.module)]
    result["omega_in_optimizer"] = {name: in_optimizer(engine, p) for name, p in engine.module.named_parameters()
                                    if name.endswith("_omega.omega")}
    result["omega_before"] = omegas(engine)
    seen = {}
    hooks = capture_router_call(autoep.routers(engine.module)[0], seen)
    result["losses"] = [train_step(engine, step) for step in range(3)]
    for hook in hooks:
        hook.remove()
    result["capture"] = seen
    result["omega_after"] = omegas(engine)
    return result


def preset_run(family: str) -> dict:
    model = build(family)
    config = ds_config(family)
    blocks = autoep.use_sparsemixer(model, config)
    engine = engine_for(model, config)
    result = {"blocks": blocks, "eval_tokens": batch(-1), "eval_logits": eval_logits(engine)}
    result["options"] = [dict(vars(r.options)) for r in autoep.routers(engine.module)]
    return result


def resume_run(first: int = 2, then: int = 3) -> dict:
    """``first`` steps, a checkpoint, ``then`` steps; a fresh engine of other weights loads it and repeats them."""
    config = ds_config("phimoe")
    model = build("phimoe")
    autoep.use_sparsemixer(model, config, estimator="midpoint")
    engine = engine_for(model, config)
    for step in range(first):
        train_step(engine, step)
    engine.save_checkpoint(str(args.out / "ckpt"), tag="resume")
    saved_run = [train_step(engine, step) for step in range(first, first + then)]
    fresh = build("phimoe", seed=1)
    autoep.use_sparsemixer(fresh, config, estimator="midpoint")
    engine = engine_for(fresh, config)
    path, _ = engine.load_checkpoint(str(args.out / "ckpt"), tag="resume")
    loaded_run = [train_step(engine, step) for step in range(first, first + then)]
    return {"saved": saved_run, "loaded": loaded_run, "loaded_from": str(path)}


init_distributed()
rank = dist.get_rank()
if args.stage == 2:
    runs = {"grouped_heun3_global": lambda: phimoe_run(True, "heun3", "global"),
            "loop_midpoint_local": lambda: phimoe_run(False, "midpoint", "local"),
            "mixtral": lambda: preset_run("mixtral")}
else:
    runs = {"grouped_midpoint_local": lambda: phimoe_run(True, "midpoint", "local"),
            "loop_heun3_global": lambda: phimoe_run(False, "heun3", "global"),
            "qwen3_moe": lambda: preset_run("qwen3_moe"),
            "resume": resume_run}
results = {name: run() for name, run in runs.items()}
torch.save(results, args.out / f"rank{rank}.pt")
exit_rank(0)  # not the interpreter's finalization, which gloo can abort (see exit_rank)
