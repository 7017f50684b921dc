"""Training curves of a stage as one PNG (logged with its MLflow run and published next to its manifest)."""

from __future__ import annotations

PLOTTED = ("reward", "loss", "kl", "forward_kl", "c2", "entropy")


def plot_history(history: list[dict], path, title: str) -> bool:
    """Training curves (reward, loss, KL, C2, entropy per step) as one PNG; False when nothing to plot."""
    keys = [k for k in PLOTTED if any(k in h for h in history)]
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
