"""The loss curve as a PNG artifact (the Argo UI shows images inline)."""

from __future__ import annotations

from pathlib import Path


def write_png(history: list[dict[str, float]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="." if len(history) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: reproducible bytes
    plt.close(fig)
