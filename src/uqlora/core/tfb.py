"""Training-free Bayesianization (TFB; Shi, Wang et al., NeurIPS 2025) of a finished LoRA adapter, plain torch.

Per LoRA layer, the SVD B = U diag(d) V^T gives the equivalent adapter B' = U diag(d), A' = V^T A (B'A' = BA)
(:func:`svd_reparameterise`). TFB's posterior is Gaussian on A' with row i's standard deviation sigma / d_i, one
scalar sigma for the whole model, so the perturbation of the product, B' dA' = sigma U E (E standard normal), is
isotropic in the adapter's output space. Here the adapter is not rewritten: the noise of A' is rotated back,
dA = V dA', which gives exactly B(A + dA) = B'(A' + dA') and keeps the sigma = 0 model the MAP model bit for
bit. Directions with d_i <= max(d) * r * float-eps (a zero column of B, e.g. an untrained layer) get std 0:
they cannot change the output.

sigma is searched on an anchor set (:func:`search_sigma`): the largest sigma in [low, high] whose change of a
predictive score against sigma = 0 -- the relative NLL change |NLL(sigma) - NLL(0)| / NLL(0) of the sigma = 0
pseudo-labels (or of the true labels), or the absolute accuracy change -- stays within the tolerance.
(The official code divides the relative change by the anchor size and returns the last sigma that violated
the tolerance; see the method's documentation.)
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from uqlora.core.blob import LoRANoise
from uqlora.errors import UqloraError

log = logging.getLogger(__name__)


def svd_reparameterise(A: torch.Tensor, B: torch.Tensor):
    """``(A', B', d, V)`` with B = U diag(d) V^T (float64 SVD), A' = V^T A, B' = U diag(d)."""
    U, d, Vh = torch.linalg.svd(B.double(), full_matrices=False)
    V = Vh.T
    return V.T @ A.double(), U * d, d, V


class TFB(LoRANoise):
    """TFB's noise on every LoRA layer, for a given ``sigma`` (0 until set). ``d`` and ``V`` come from the SVD of
    each layer's B at construction (or from a saved state)."""

    def __init__(self, layers, d: list[torch.Tensor] | None = None, V: list[torch.Tensor] | None = None):
        super().__init__(layers)
        self.sigma = 0.0
        for i in range(len(self)):
            if d is None:
                _, _, di, Vi = svd_reparameterise(self.lora_A(i).weight.detach(), self.lora_B(i).weight.detach())
            else:
                di, Vi = d[i].double(), V[i].double()
            dev = self.lora_A(i).weight.device
            self.register_buffer(f"d{i}", di.to(dev), persistent=False)
            self.register_buffer(f"V{i}", Vi.to(dev), persistent=False)

    def d(self, i: int) -> torch.Tensor:
        return getattr(self, f"d{i}")

    def V(self, i: int) -> torch.Tensor:
        return getattr(self, f"V{i}")

    def row_std(self, i: int) -> torch.Tensor:
        """sigma / d_i for the rows of A' (0 where d_i is numerically zero)."""
        d = self.d(i)
        tol = d.max().clamp_min(0) * d.numel() * torch.finfo(torch.float32).eps
        return torch.where(d > tol, self.sigma / d.clamp_min(1e-300), torch.zeros_like(d))

    def perturbation(self, i: int, e: torch.Tensor) -> torch.Tensor:
        """dA = V diag(sigma / d) E [r, in] for standard normals E (float64)."""
        return self.V(i) @ (self.row_std(i).unsqueeze(1) * e.double())

    def draw_output(self, i, x, out, e):
        if self.sigma == 0.0:
            return out
        return out + x @ self.perturbation(i, e).to(x.dtype).t()

    def check_adapter(self) -> None:
        """Refuse singular values that are not those of the model's B (a state searched for another adapter)."""
        for i in range(len(self)):
            now = torch.linalg.svdvals(self.lora_B(i).weight.detach().double())
            if not torch.allclose(now.to(self.d(i).device), self.d(i), rtol=1e-4, atol=1e-8):
                raise UqloraError(f"the saved TFB state does not belong to this adapter: LoRA layer '{self.names[i]}' "
                                  "has other singular values of B")

    def state(self) -> dict:
        return {"sigma": float(self.sigma), "d": [self.d(i).cpu() for i in range(len(self))],
                "V": [self.V(i).cpu() for i in range(len(self))]}


def search_sigma(change: Callable[[float], float], low: float, high: float, iters: int, tolerance: float):
    """The largest sigma in [low, high] with ``change(sigma) <= tolerance``, to (high - low) / 2^iters, for a
    change that grows with sigma. ``high`` is tried first (returned when within the tolerance); then ``iters``
    bisections keep low within and high beyond the tolerance; ``low`` is returned. When even ``low`` is beyond
    the tolerance it is returned with a warning. Returns ``(sigma, [(sigma, change), ...] in evaluation order)``."""
    if not 0 < low < high:
        raise UqloraError(f"the sigma search needs 0 < low < high, got low={low}, high={high}")
    history = []

    def evaluate(s):
        c = float(change(s))
        history.append((float(s), c))
        return c

    if evaluate(high) <= tolerance:
        return float(high), history
    lo, hi = float(low), float(high)
    for _ in range(int(iters)):
        mid = (lo + hi) / 2
        if evaluate(mid) <= tolerance:
            lo = mid
        else:
            hi = mid
    if lo == low and evaluate(low) > tolerance:
        log.warning("TFB: even sigma=%g changes the anchor score by %.4g > tolerance %g; using it anyway", low,
                    history[-1][1], tolerance)
    return lo, history


def change_lower_bound(criterion: str, nll: float, correct: int, n: int, n_total: int, nll0: float,
                       acc0: float) -> float:
    """A lower bound on a sigma's anchor change from its first ``n`` of ``n_total`` anchors (``nll``: their summed
    NLL, ``correct``: their correct predictions), against the sigma = 0 mean NLL ``nll0`` and accuracy ``acc0``:
    the NLL of the anchors not read yet is >= 0, and they can at most all be right. 0 when nothing is proven."""
    if criterion == "nll":
        return max(0.0, (nll / n_total - nll0) / max(nll0, 1e-12))
    return max(0.0, acc0 - (correct + n_total - n) / n_total)


@torch.no_grad()
def predictive_probs(logits_fn: Callable, batches: Iterable[dict], noise: LoRANoise, draws) -> list[torch.Tensor]:
    """Per batch: the mean of softmax(logits_fn(batch)) over the weight ``draws`` of ``noise`` (the mean weights
    when there are none), float64 on the CPU."""
    out = []
    for batch in batches:
        probs = None
        for draw in (draws or [None]):
            with noise.use_draw(draw):
                p = logits_fn(batch).double().softmax(-1)
            probs = p if probs is None else probs + p
        out.append((probs / max(1, len(draws or []))).cpu())
    return out


def score(probs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[float, int, int]:
    """``(summed NLL, number correct, count)`` of per-batch probabilities against per-batch target labels."""
    nll, correct, n = 0.0, 0, 0
    for p, y in zip(probs, targets):
        y = y.to(p.device)
        nll += float(-p.gather(1, y.unsqueeze(1)).clamp_min(1e-300).log().sum())
        correct += int((p.argmax(-1) == y).sum())
        n += int(y.numel())
    return nll, correct, n
