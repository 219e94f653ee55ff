"""One training step's forward + backward of the default model per router, in one process.

The end-to-end benchmark (e2e.py) times whole launched runs, whose speed on a shared machine moves
by more than the few percent between routers. This one times only the model's forward + backward on
one batch, all routers in the same process, interleaved (A B C ... A B C ...), with medians: what
remains of a difference here is the router's own cost. ``sparsemixer without omega`` drops the
midpoint estimator's per-channel output scale, to show what that multiply costs.

    python benchmarks/model_step.py            # configs/cpu_small.yaml, ep_size 1, 60 rounds
    python benchmarks/model_step.py --smoke    # a tiny model, 3 rounds (CI)
"""
import argparse
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from sparsemixer_ds.config import load_config  # noqa: E402
from sparsemixer_ds.models.families import get_family  # noqa: E402
from sparsemixer_ds.models.moe import SparseMixerMoE  # noqa: E402
from sparsemixer_ds.routing.registry import main_routers  # noqa: E402
from sparsemixer_ds.testing import TINY, time_interleaved  # noqa: E402

NO_OMEGA = "sparsemixer without omega"


def build(config: Path, router: str, k: int, extra: list) -> torch.nn.Module:
    cfg = load_config(config, [f"moe.router={router}", f"moe.top_k={k}", "moe.ep_size=1", "model.vocab_size=257",
                               *extra])
    torch.manual_seed(0)
    return get_family(cfg).build(cfg)


def make_step(model: torch.nn.Module, tokens: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/cpu_small.yaml"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: what each of 2 ranks gets here)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/model_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = TINY if args.smoke else []
    rounds = 3 if args.smoke else args.rounds

    device = torch.device(args.device)
    models = {router.name: build(args.config, router.name, router.top_k[0], extra) for router in main_routers()}
    models[NO_OMEGA] = build(args.config, "sparsemixer", 1, extra)
    for layer in models[NO_OMEGA].modules():
        if isinstance(layer, SparseMixerMoE):
            layer.register_parameter("omega", None)
    cfg = load_config(args.config, extra)
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (cfg.train.micro_batch, cfg.model.seq_len + 1), device=device)
    steps = {name: make_step(model.to(device), tokens) for name, model in models.items()}
    medians = time_interleaved(steps, rounds, device)

    switch = medians["switch"]
    rows = []
    print(f"model forward+backward, {args.config} (ep_size 1), batch {tuple(tokens[:, :-1].shape)}, "
          f"median of {rounds} interleaved rounds, {device}, {args.threads} thread(s), torch {torch.__version__}")
    header = f"{'router':<26} | {'ms':>8} | {'vs switch':>9}"
    print(header)
    print("-" * len(header))
    for name, seconds in medians.items():
        ms = seconds * 1e3
        rows.append({"router": name, "ms": ms, "vs_switch": ms / (switch * 1e3)})
        print(f"{name:<26} | {ms:>8.2f} | {ms / (switch * 1e3):>8.3f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": str(args.config), "device": str(device), "rounds": rounds,
                                     "threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
