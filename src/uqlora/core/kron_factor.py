"""Symmetric PSD curvature factors: a running sum of outer products (dense, or a low-rank square root
refreshed by truncated SVD) and eigen/singular-value decompositions that never crash on a singular or
ill-conditioned factor. Used by :mod:`uqlora.core.kfac` (KFAC factors) and :mod:`uqlora.core.laplace`."""
from __future__ import annotations

import logging
import warnings

import torch

from uqlora.errors import UqloraError

log = logging.getLogger(__name__)

JITTERS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to the mean diagonal, tried in turn


def stable_eigh(mat: torch.Tensor, what: str = "KFAC factor") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric PSD curvature factor that never crashes on a singular or
    ill-conditioned one: a non-finite factor is a one-line error (its gradients overflowed); when the solver
    does not converge, ``jitter * I`` (relative jitter 1e-10, 1e-8, ... of the mean diagonal) is added and the
    decomposition retried, with a warning naming the jitter. A singular factor needs no jitter (its zero
    eigenvalues are fine: the prior precision keeps the posterior proper)."""
    if not torch.isfinite(mat).all():
        raise UqloraError(f"{what} has non-finite entries (NaN/inf curvature or variance): check the MAP model's "
                          "loss, or fit in fp32")
    try:
        return torch.linalg.eigh(mat)
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    scale = float(mat.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(torch.finfo(mat.dtype).tiny))
    for rel in JITTERS:
        try:
            lam, Q = torch.linalg.eigh(mat + rel * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        msg = (f"{what} ({mat.shape[-1]}x{mat.shape[-1]}) is ill-conditioned: eigh did not converge; "
               f"decomposed it with jitter {rel * scale:.3g} * I (relative {rel:g}) added, then removed")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return lam - rel * scale, Q  # eigh(M + jI) = Q (lam + j) Q^T: the same eigenvectors, M's own spectrum
    raise UqloraError(f"{what} ({mat.shape[-1]}x{mat.shape[-1]}) could not be decomposed even with relative "
                      f"jitter {JITTERS[-1]:g}")


def stable_svd(mat: torch.Tensor, what: str = "KFAC low-rank factor") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, S)`` of the thin SVD of ``mat`` [d, m]; when the SVD does not converge, from the (jittered, see
    :func:`stable_eigh`) eigendecomposition of the small Gram matrix ``mat^T mat`` instead."""
    if not torch.isfinite(mat).all():
        raise UqloraError(f"{what} has non-finite entries (NaN/inf curvature): check the MAP model's loss, or fit in fp32")
    try:
        U, S, _ = torch.linalg.svd(mat, full_matrices=False)
        return U, S
    except torch.linalg.LinAlgError:
        pass
    _, V = stable_eigh(mat.T @ mat, what)
    W = mat @ V.flip(1)                       # = U S with S the column norms (exact for any orthonormal V)
    S = W.norm(dim=0)
    # the Gram matrix squares the condition number: directions below sqrt(eps) of the largest are noise
    keep = S > S.max() * torch.finfo(mat.dtype).eps ** 0.5 if S.numel() else S > 0
    U = W[:, keep] / S[keep]
    msg = f"{what}: the SVD did not converge; used the eigendecomposition of its Gram matrix"
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    log.warning(msg)
    return U, S[keep]


class Factor:
    """Running ``sum_i v_i v_i^T`` over rows ``v`` of width ``dim``: dense (float64), or as a rank-``rank``
    square root refreshed by truncated SVD every ``flush_rows`` buffered rows."""

    def __init__(self, dim: int, rank: int | None = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        self.dim, self.rank, self.dtype = int(dim), None if rank is None else int(rank), dtype
        self.lowrank = self.rank is not None
        if self.lowrank:
            self.root = torch.zeros(self.dim, 0, dtype=dtype, device=device)
            self._buf: list[torch.Tensor] = []
            self._nbuf = 0
            self.flush_rows = max(256, 4 * self.rank)
        else:
            self.mat = torch.zeros(self.dim, self.dim, dtype=dtype, device=device)

    def update(self, v: torch.Tensor) -> None:
        v = v.detach().reshape(-1, self.dim).to(self.dtype)
        if not self.lowrank:
            self.mat.addmm_(v.T, v)
            return
        self._buf.append(v)
        self._nbuf += v.shape[0]
        if self._nbuf >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.lowrank or not self._buf:
            return
        stacked = torch.cat([self.root, torch.cat(self._buf).T], dim=1)  # [d, k + n]
        self._buf, self._nbuf = [], 0
        U, S = stable_svd(stacked)
        k = min(self.rank, S.numel())
        self.root = U[:, :k] * S[:k]

    def merge(self, other: "Factor") -> None:
        """Add another accumulator's sum (e.g. another process's factor)."""
        if self.lowrank:
            other._flush()
            self._buf.append(other.root.T.to(self.root))
            self._nbuf += other.root.shape[1]
            self._flush()
        else:
            self.mat += other.mat.to(self.mat)

    def all_reduce(self, group=None) -> None:
        """Replace this process's sum by the sum over all processes of ``group`` (torch.distributed): dense
        factors by an all-reduce; low-rank ones by gathering every process's square root (zero-padded to
        ``rank`` columns) and re-truncating them stacked in rank order, the same computation on every process
        (:meth:`merge` over all ranks), so all processes end with the same factor."""
        import torch.distributed as dist

        if not self.lowrank:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM, group=group)
            return
        self._flush()
        root = torch.zeros(self.dim, self.rank, dtype=self.dtype, device=self.root.device)
        root[:, :self.root.shape[1]] = self.root
        roots = [torch.empty_like(root) for _ in range(dist.get_world_size(group))]
        dist.all_gather(roots, root, group=group)
        self.root = root[:, :0]
        self._buf, self._nbuf = [r.T for r in roots], sum(r.shape[1] for r in roots)
        self._flush()

    def dense(self) -> torch.Tensor:
        if self.lowrank:
            self._flush()
            return self.root @ self.root.T
        return self.mat

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q [d, k], lam [k])`` with ``Q diag(lam) Q^T`` = the factor; k = d when dense. Tiny negative
        eigenvalues from round-off are clipped to 0 (a warning when they are not tiny)."""
        if self.lowrank:
            self._flush()
            U, S = stable_svd(self.root)
            keep = S > 0
            return U[:, keep].contiguous(), S[keep] ** 2
        mat = 0.5 * (self.mat + self.mat.T)
        lam, Q = stable_eigh(mat)
        neg = lam.min().item()
        if neg < -1e-6 * max(lam.max().item(), 1e-30):
            log.warning("KFAC factor has a negative eigenvalue %.3g (max %.3g); clipping to 0", neg, lam.max().item())
        return Q.contiguous(), lam.clamp(min=0.0)
