"""Linear centred kernel alignment (CKA) between feature sets, and its streaming form for heads.

Linear CKA (Kornblith, Norouzi, Lee and Hinton, "Similarity of Neural Network Representations
Revisited", ICML 2019, eq. 2 with a linear kernel): for ``X`` (n, p) and ``Y`` (n, q) with
column-centred ``Xc``, ``Yc``,

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

in [0, 1]; 1 for ``Y = X``; invariant to orthogonal transforms and isotropic scaling of either
side, not to arbitrary invertible linear maps. Only the (p + q)^2 covariance entries are needed, so
the head similarities of a whole split are accumulated batch by batch (:class:`HeadCKA`) without
keeping the features.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of ``x`` (n, p) and ``y`` (n, q): the same n examples (rows) in both.

    Raises:
        ValueError: the inputs are not 2-D or have different numbers of rows.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, p) and (n, q) features of the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


def cka_from_covariance(cov: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(H, H)`` linear CKA between the H equal column blocks of a centred covariance ``cov``
    (C, C), C = H * head_dim: entry (i, j) = ||C_ij||_F^2 / (||C_ii||_F ||C_jj||_F)."""
    d = cov.shape[0] // num_heads
    blocks = cov.reshape(num_heads, d, num_heads, d).permute(0, 2, 1, 3)  # (H, H, d, d)
    sq = blocks.pow(2).sum((-1, -2))  # ||C_ij||_F^2
    norms = sq.diagonal().sqrt()
    return sq / (norms[:, None] * norms[None, :])


class HeadCKA:
    """Streams the head outputs of one attention module and gives the ``(H, H)`` linear CKA
    between heads over every example seen.

    ``update(z)`` takes ``z`` (..., C) with C = H * head_dim (the input of ``attn.proj``: head h is
    columns ``h*head_dim:(h+1)*head_dim``); every leading position (token x sample) is one example.
    Sums are kept in float64: ``sum z`` and ``z^T z``.
    """

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self.n = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().reshape(-1, z.shape[-1]).double()
        if self.total is None:
            self.total = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
            self.gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
        self.n += z.shape[0]
        self.total += z.sum(0)
        self.gram += z.T @ z

    def matrix(self) -> torch.Tensor:
        """``(H, H)`` float64 CKA matrix on the CPU (diagonal 1).

        Raises:
            RuntimeError: nothing was seen.
        """
        if self.gram is None or self.n == 0:
            raise RuntimeError("HeadCKA.matrix() before any update(): no head outputs were recorded")
        mean = self.total / self.n
        cov = self.gram - self.n * torch.outer(mean, mean)  # = Zc^T Zc
        return cka_from_covariance(cov, self.num_heads).cpu()


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN for 1 x 1)."""
    h = matrix.shape[0]
    if h < 2:
        return float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (h * h - h))
