"""`mgrow plot`: the loss curve of a run's metrics file (JSON lines), growth events marked."""

from __future__ import annotations

import json
import os

from mgrow.core.errors import ConfigError


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ConfigError("--metrics", f"metrics file {path} does not exist")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, out_path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    events = [r for r in records if r.get("event") == "growth"]
    if not train:
        raise ConfigError("--metrics", f"{metrics_path} holds no training losses")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(*zip(*train), label="training loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", markersize=4)
    for index, event in enumerate(events):
        ax.axvline(event["step"], color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"grow: {event['params_before'] / 1e6:.2f}M -> {event['params_after'] / 1e6:.2f}M params\n"
                    f"held-batch loss {event['held_loss_before']:.4f} -> {event['held_loss_after']:.4f}",
                    xy=(event["step"], 1 - 0.12 * (index + 1)), xycoords=("data", "axes fraction"),
                    xytext=(6, 0), textcoords="offset points", fontsize=8, color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    return save_figure(fig, ax, title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))), out_path)


def save_figure(fig, ax, title: str, out_path: str) -> str:
    """Title, grid and legend on ``ax``; ``fig`` written to ``out_path`` (PNG) and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
