"""The analysis figures as PNG files (matplotlib, Agg backend: no display needed).

Each function writes one file and returns its path. Matrices are drawn with ``imshow``; small
matrices (up to 16 x 16) get their values written in the cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _annotate(ax, m: np.ndarray, fmt: str = "{:.2f}") -> None:
    if max(m.shape) > 16:
        return
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                color="white" if v < (np.nanmin(m) + np.nanmax(m)) / 2 else "black")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def head_cka(matrices: Mapping[str, np.ndarray], means: Mapping[str, float], path: Path, title: str) -> Path:
    """One (H, H) CKA heatmap per layer (``matrices``: layer key -> matrix), colour scale 0-1."""
    plt = _plt()
    rows, cols = _grid(len(matrices))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(matrices):]:
        ax.axis("off")
    for ax, (key, m) in zip(axes.flat, matrices.items()):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        _annotate(ax, m)
        ax.set_title(f"{key}: mean off-diag {means[key]:.3f}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("head")
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="linear CKA")
    fig.suptitle(title)
    return _save(fig, path)


def layer_head_maps(maps: Mapping[str, np.ndarray], layers: Sequence[str], path: Path, title: str) -> Path:
    """Side-by-side (layers x heads) heatmaps, one per entry of ``maps`` (name -> matrix)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 + 0.6 * len(next(iter(maps.values()))[0]) * len(maps) + 2 * len(maps),
                                                    1.5 + 0.45 * len(layers)), squeeze=False)
    for ax, (name, m) in zip(axes.flat, maps.items()):
        im = ax.imshow(m, cmap="magma", aspect="auto")
        _annotate(ax, m)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def corruption_curves(results: Mapping[str, Mapping[int, float]], clean: float, path: Path) -> Path:
    """Accuracy against severity, one line per corruption, the clean accuracy dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_severity in results.items():
        sev = sorted(by_severity)
        ax.plot(sev, [by_severity[s] for s in sev], marker="o", label=name)
    ax.axhline(clean, color="black", linestyle="--", label=f"clean {clean:.3f}")
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, 6))
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("accuracy under corruptions (imagecorruptions)")
    return _save(fig, path)


def patterns(masks: Mapping[str, np.ndarray | None], path: Path, title: str) -> Path:
    """Rows = layers, columns = heads: each head's boolean (L, L) mask (white = attended; a dense
    layer, ``None``, is drawn all white and titled so)."""
    plt = _plt()
    num_heads = max((m.shape[0] for m in masks.values() if m is not None), default=1)
    rows, cols = len(masks), num_heads
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
    for r, (key, m) in enumerate(masks.items()):
        for h in range(cols):
            ax = axes[r, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if m is None:
                if h == 0:
                    ax.imshow(np.ones((2, 2)), cmap="gray", vmin=0, vmax=1)
                    ax.set_title(f"{key}: dense (every head)", fontsize=7)
                else:
                    ax.axis("off")
            elif h < m.shape[0]:
                ax.imshow(m[h], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"{key} h{h}: {100 * m[h].mean():.1f}%", fontsize=7)
            else:
                ax.axis("off")
    fig.suptitle(title + " (rows: query, columns: key; white = attended)", fontsize=9)
    return _save(fig, path)


def cls_attention(images: Sequence[np.ndarray], maps: np.ndarray, row_labels: Sequence[str], path: Path, title: str) -> Path:
    """Rows = inputs (or frames): the input image, then each head's CLS-to-patch attention on the
    patch grid. ``images``: (h, w) or (h, w, 3) arrays in [0, 1]; ``maps``: (rows, H, gh, gw)."""
    plt = _plt()
    rows, heads = maps.shape[:2]
    fig, axes = plt.subplots(rows, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * rows + 0.4), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r], cmap="gray" if images[r].ndim == 2 else None, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
        for h in range(heads):
            axes[r, h + 1].imshow(maps[r, h], cmap="inferno", interpolation="nearest")
            if r == 0:
                axes[r, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
