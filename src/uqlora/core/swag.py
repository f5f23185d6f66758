"""SWAG (Maddox et al. 2019) over a set of parameters, as SWAG-LoRA (Onal et al. 2024) applies it to
the LoRA adapters (+ the trained head). Plain torch, no Trainer.

Moments over the collected snapshots theta_1..theta_n (flattened parameter vectors):

    mean   = 1/n sum_i theta_i,        sq_mean = 1/n sum_i theta_i^2
    var    = max(sq_mean - mean^2, var_floor)                      (diagonal)
    D      = [theta_i - mean_i]  for the last K snapshots, rows   (mean_i = running mean after adding theta_i)

A draw with ``scale`` s and K' = number of stored deviation rows (K' <= K):

    low-rank + diagonal (default):  theta = mean + sqrt(s) * (sqrt(var) * z1 + D^T z2 / sqrt(K' - 1)) / sqrt(2)
    diagonal only:                  theta = mean + sqrt(s) * sqrt(var) * z1

with z1 ~ N(0, I_P), z2 ~ N(0, I_K'), so Cov[theta] = s * 0.5 * (diag(var) + D^T D / (K' - 1)), the SWAG
covariance, or s * diag(var). Differences from the reference code (fortuinlab/swag-lora, which inherits
swa_gaussian): the 1/2 of the SWAG covariance is part of the formula instead of being left to ``scale``
(their evaluation runs at scale 1.0, i.e. twice the SWAG covariance), and the low-rank term divides by the
number of rows actually stored, not by the maximum K.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch


def flatten(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def assign(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat vector back into the parameters (in place, keeping their dtype/device)."""
    i = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[i: i + n].view_as(p).to(dtype=p.dtype, device=p.device))
        i += n
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries for {i} parameters")


class SWAG:
    """First and second moments plus a rank-K deviation matrix of a parameter vector of size P."""

    def __init__(self, num_params: int, max_rank: int = 5, var_floor: float = 1e-30,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_rank < 2:
            raise ValueError(f"SWAG max_rank (K) must be >= 2, got {max_rank}")
        self.P, self.K, self.var_floor, self.dtype = int(num_params), int(max_rank), float(var_floor), dtype
        self.n = 0
        self.mean = torch.zeros(self.P, dtype=dtype, device=device)
        self.sq_mean = torch.zeros(self.P, dtype=dtype, device=device)
        self.dev = torch.zeros(0, self.P, dtype=dtype, device=device)  # rows: oldest first

    @torch.no_grad()
    def collect(self, theta: torch.Tensor) -> None:
        theta = theta.detach().reshape(-1).to(self.mean)
        if theta.numel() != self.P:
            raise ValueError(f"snapshot has {theta.numel()} entries, SWAG was built for {self.P}")
        w = 1.0 / (self.n + 1)
        self.mean.mul_(1 - w).add_(theta, alpha=w)
        self.sq_mean.mul_(1 - w).add_(theta * theta, alpha=w)
        self.n += 1
        self.dev = torch.cat([self.dev[-(self.K - 1):] if self.K > 1 else self.dev[:0],
                              (theta - self.mean).unsqueeze(0)])

    @property
    def rank(self) -> int:
        return int(self.dev.shape[0])

    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean ** 2).clamp(min=self.var_floor)

    def _low_rank_ok(self, diag_only: bool) -> bool:
        if diag_only:
            return False
        if self.rank < 2:
            warnings.warn(f"SWAG has {self.rank} deviation row(s) (< 2): sampling with the diagonal only")
            return False
        return True

    @torch.no_grad()
    def sample(self, scale: float = 1.0, generator: torch.Generator | None = None,
               diag_only: bool = False) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("SWAG.sample() before any snapshot was collected")
        z1 = torch.randn(self.P, generator=generator, dtype=self.dtype).to(self.mean.device)
        draw = self.variance().sqrt() * z1
        if self._low_rank_ok(diag_only):
            z2 = torch.randn(self.rank, generator=generator, dtype=self.dtype).to(self.mean.device)
            draw = (draw + self.dev.T @ z2 / math.sqrt(self.rank - 1)) / math.sqrt(2.0)
        return self.mean + math.sqrt(scale) * draw

    def covariance(self, scale: float = 1.0, diag_only: bool = False) -> torch.Tensor:
        """The dense covariance of :meth:`sample` (P x P; for tests and small P only)."""
        cov = torch.diag(self.variance())
        if self._low_rank_ok(diag_only):
            cov = 0.5 * (cov + self.dev.T @ self.dev / (self.rank - 1))
        return scale * cov

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor(self.n), "K": torch.tensor(self.K), "mean": self.mean.clone(),
                "sq_mean": self.sq_mean.clone(), "dev": self.dev.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["mean"].numel() != self.P:
            raise ValueError(f"SWAG state has {state['mean'].numel()} parameters, this model has {self.P}")
        self.n, self.K = int(state["n"]), int(state["K"])
        self.mean, self.sq_mean = state["mean"].to(self.mean), state["sq_mean"].to(self.mean)
        self.dev = state["dev"].to(self.mean)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.sq_mean, self.dev))
