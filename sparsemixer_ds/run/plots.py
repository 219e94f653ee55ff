"""The end-of-run picture: loss curves and the per-layer expert-load heat map, from metrics.jsonl."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def plot_run(metrics_path: Path, out_path: Path) -> Path:
    """Left: training and validation loss against tokens. Right: each MoE layer's load per expert,
    averaged over the last quarter of the logged steps (1 / E everywhere is perfect balance)."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens_per_step = train[0]["tokens"] / train[0]["step"] if train else 1.0
    ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    ax_loss.plot([r["step"] * tokens_per_step for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax_loss.set_xlabel("tokens")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    recent = [r["layers"] for r in train[-max(1, len(train) // 4):] if r.get("layers")]
    if recent:
        load = np.mean([[layer["load"] for layer in layers] for layers in recent], axis=0)  # (layers, E)
        image = ax_load.imshow(load, aspect="auto", cmap="viridis", vmin=0.0)
        ax_load.set_xlabel("expert")
        ax_load.set_ylabel("MoE layer")
        ax_load.set_xticks(range(load.shape[1]))
        ax_load.set_yticks(range(load.shape[0]))
        fig.colorbar(image, ax=ax_load, label="fraction of routes")
    ax_load.set_title("expert load (last quarter of training)")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
