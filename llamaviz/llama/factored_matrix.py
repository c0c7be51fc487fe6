"""A low-rank product A @ B kept as its factors: the OV and QK circuits of every head, TransformerLens-style.

A is [..., l, r] and B is [..., r, n]; the matrix A @ B [..., l, n] is never built unless asked for
(`.AB`). Its SVD comes from the factors (QR of each, then the SVD of the small r x r core), so a
[L, h, m, m] circuit costs what its [L, h, m, d] factors cost.
"""

from __future__ import annotations

import functools

import torch


def _linalg(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class FactoredMatrix:
    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"factors do not chain: A is {tuple(A.shape)}, B is {tuple(B.shape)} "
                             "(A's last axis must equal B's second to last)")
        lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])  # leading axes (layer, head) broadcast
        self.A, self.B = A.expand(*lead, *A.shape[-2:]), B.expand(*lead, *B.shape[-2:])

    ldim = property(lambda self: self.A.shape[-2])
    mdim = property(lambda self: self.A.shape[-1])
    rdim = property(lambda self: self.B.shape[-1])
    shape = property(lambda self: torch.Size((*self.A.shape[:-2], self.ldim, self.rdim)))
    ndim = property(lambda self: len(self.shape))

    @property
    def AB(self) -> torch.Tensor:
        """The full matrix [..., l, n]."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """B @ A [..., r, r] (square circuits only): it has the same non-zero eigenvalues as A @ B."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix; this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @functools.cached_property
    def _svd(self):
        q_a, r_a = torch.linalg.qr(_linalg(self.A))  # A = Qa Ra, Qa [l, r]
        q_b, r_b = torch.linalg.qr(_linalg(self.B).transpose(-2, -1))  # B^T = Qb Rb
        u, s, vh = torch.linalg.svd(r_a @ r_b.transpose(-2, -1))  # core [r, r]
        return q_a @ u, s, q_b @ vh.transpose(-2, -1)

    def svd(self):
        """(U [..., l, r], S [..., r], V [..., n, r]) with U @ diag(S) @ V^T = A @ B."""
        return self._svd

    U = property(lambda self: self._svd[0])
    S = property(lambda self: self._svd[1])
    V = property(lambda self: self._svd[2])

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The r eigenvalues of B @ A (complex), the non-zero spectrum of A @ B."""
        return torch.linalg.eigvals(_linalg(self.BA))

    def norm(self) -> torch.Tensor:
        """Frobenius norm [...]."""
        return self.S.pow(2).sum(-1).sqrt()

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if other.dim() == 1:  # a vector: the factorisation collapses
            return (self.A @ (self.B @ other)[..., None])[..., 0]
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        if other.dim() == 1:
            return ((other @ self.A)[..., None, :] @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar) -> "FactoredMatrix":
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, index) -> "FactoredMatrix":
        """Index the leading axes (layer, head, ...): model.OV[3, 1] is head 1 of layer 3."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(self.shape) - 2:
            raise IndexError(f"index {index} reaches into the matrix axes; index only the {len(self.shape) - 2} "
                             "leading axes, or take .AB")
        return FactoredMatrix(self.A[index], self.B[index])

    def get_corner(self, k: int = 3) -> torch.Tensor:
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, hidden={self.mdim})"
