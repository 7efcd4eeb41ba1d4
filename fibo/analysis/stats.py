"""Per-head attention statistics: mean attention distance and attention entropy.

* **Mean attention distance** (Dosovitskiy et al. 2021, ViT, Fig. 7 / App. D.7): for each patch
  query, the Euclidean distance on the patch grid (unit: one patch) to each patch key, weighted by
  the attention probability; averaged over queries and samples. The CLS token is left out on both
  sides (it has no grid position): the weights are the probabilities over patch keys, renormalised
  to sum to 1. Tokens are laid out as fibo's models lay them: raster order on the ``(rows, cols)``
  grid; joint space-time attention over T frames is time-major ``(frame, row, col)``; TimeSformer's
  temporal attention runs over frames, so its distance is in frames.
* **Entropy** (nats) of each patch query's full attention row (CLS key included), averaged the
  same way; ``ln(L)`` is uniform attention over L keys, 0 is one-hot.
"""

from __future__ import annotations

import torch


def token_coordinates(num_tokens: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """``(num_tokens, k)`` float coordinates of the patch tokens: ``(row, col)`` when
    ``num_tokens = rows * cols``; ``(frame, row, col)`` when it is a multiple (joint space-time,
    time-major); else, or with ``grid=None``, ``(index,)`` (a 1-D sequence, e.g. the frames of
    temporal attention)."""
    idx = torch.arange(num_tokens)
    if grid is None:
        return idx[:, None].float()
    rows, cols = grid
    p = rows * cols
    if num_tokens == p:
        return torch.stack([idx // cols, idx % cols], 1).float()
    if num_tokens % p == 0:
        s = idx % p
        return torch.stack([idx // p, s // cols, s % cols], 1).float()
    return idx[:, None].float()


class AttentionStats:
    """Accumulates the mean attention distance and entropy per head of one attention module.

    ``update(probs)`` takes ``(B, H, L, L)`` probabilities of a module with ``num_prefix_tokens``
    leading tokens (CLS) and ``L - num_prefix_tokens`` patch tokens on ``grid`` (None: a 1-D
    sequence, see :func:`token_coordinates`)."""

    def __init__(self, num_heads: int, num_prefix_tokens: int, grid: tuple[int, int] | None) -> None:
        self.num_heads, self.prefix, self.grid = num_heads, num_prefix_tokens, grid
        self.distance = torch.zeros(num_heads, dtype=torch.float64)
        self.entropy = torch.zeros(num_heads, dtype=torch.float64)
        self.rows = 0
        self._dist: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _distances(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._dist:
            xy = token_coordinates(n, self.grid)
            self._dist[key] = torch.cdist(xy, xy).to(device)
        return self._dist[key]

    def update(self, probs: torch.Tensor) -> None:
        probs = probs.detach().float()
        rows = probs[:, :, self.prefix:]  # patch queries (B, H, n, L)
        n = rows.shape[2]
        entropy = -torch.special.xlogy(rows, rows).sum(-1)  # (B, H, n)
        patch = rows[..., self.prefix:]  # patch keys (B, H, n, n)
        weights = patch / patch.sum(-1, keepdim=True).clamp_min(1e-12)
        distance = (weights * self._distances(n, probs.device)).sum(-1)  # (B, H, n)
        self.entropy += entropy.sum((0, 2)).double().cpu()
        self.distance += distance.sum((0, 2)).double().cpu()
        self.rows += rows.shape[0] * n

    def result(self) -> dict[str, torch.Tensor]:
        """``{"distance": (H,), "entropy": (H,)}`` means over every patch query seen."""
        if self.rows == 0:
            raise RuntimeError("AttentionStats.result() before any update()")
        return {"distance": self.distance / self.rows, "entropy": self.entropy / self.rows}
