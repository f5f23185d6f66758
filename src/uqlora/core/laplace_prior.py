"""Prior precision of the Kronecker-factored Laplace posterior (:class:`uqlora.core.laplace.KronPosterior`).

* ``marglik`` (:func:`tune_marglik`): maximise the log evidence over log delta (one value, or one per layer)
  with Adam (:meth:`KronPosterior.optimize_marglik`); warns when it has not converged or runs to an extreme.
* ``val_nll`` (:func:`tune_val_nll`): minimise the predictive NLL on held-out data, first over a grid of
  scalar values -- *widened* by the grid's own end step while the best value is on an end of the grid, up
  to ``GRID_LIMITS``; a best value still on an end is reported (``prior_at_edge``) and logged as a warning --
  then, with ``search="gradient"``, by Adam on log delta from the grid's best value.

The held-out NLL comes from the per-batch GLM terms ``(f_mu [B, C], projections of the Jacobians
(KronPosterior.project), labels [B], choice mask or None)``, one pass over the data. The grid search streams:
as the batches go by it computes, for every candidate value (the grid and all its widenings), the diagonal of
J Sigma J^T (probit link, :func:`diag_variances`) or the whole C x C matrix (mc link, :func:`full_variances`),
so memory is O(N C^2 K), not the size of the projections. The mc link's NLL uses *common random numbers*: one
set of normal draws per batch (from ``seed``) shared by every candidate, so the NLL is a deterministic,
smooth function of the prior and candidates are compared without Monte-Carlo noise between them. The gradient
search and the bridge link keep the projections (:func:`predictive_nll`, the same draws on every call).
"""
from __future__ import annotations

import logging
import math

import torch

from uqlora.core.laplace import KronPosterior, glm_predictive
from uqlora.errors import UqloraError

log = logging.getLogger(__name__)
GRID_LIMITS = (1e-10, 1e10)   # the widened grid never leaves this range
EXTREME = (1e-6, 1e6)         # a marglik prior outside this range is reported


def predictive_nll(post: KronPosterior, cache: list, delta: torch.Tensor, link: str = "probit",
                   n_samples: int = 100, seed: int = 0) -> torch.Tensor:
    """Mean NLL of the GLM predictive with prior precision ``delta`` [L] over the cached batches (mc link: the
    same ``n_samples`` draws from ``seed`` on every call)."""
    tot, n = 0.0, 0
    gen = torch.Generator().manual_seed(int(seed))
    for f_mu, proj, y, mask in cache:
        p, _ = glm_predictive(f_mu, post.functional_variance(proj, delta), link, n_samples=n_samples,
                              generator=gen, mask=mask)
        tot = tot - torch.log(p.gather(1, y.unsqueeze(1)).clamp(min=1e-12)).sum()
        n += y.numel()
    return tot / n


def diag_variances(post: KronPosterior, proj, deltas: torch.Tensor) -> torch.Tensor:
    """``diag(J Sigma J^T)`` [B, C, K] of one batch's projections (:meth:`KronPosterior.project`) for each
    row of ``deltas`` [K, L] (a prior precision per layer): per layer ``sum_ij Mt_ij^2 / (lam_ij + delta)``
    (minus the 1/delta part of a low-rank layer's eigenspace, plus its ``<J, J> / delta``)."""
    var = None
    for li, ((Mt, inner), lam, full) in enumerate(zip(proj, post.lam, post.full)):
        B, C = Mt.shape[:2]
        d = deltas[:, li].to(torch.float64)
        coef = 1.0 / (lam.reshape(-1, 1) + d) - (0.0 if full else 1.0 / d)              # [P_l, K]
        v = (Mt.double().reshape(B * C, -1) ** 2) @ coef
        if inner is not None:
            v = v + torch.diagonal(inner.double(), dim1=-2, dim2=-1).reshape(B * C, 1) / d
        var = v.reshape(B, C, -1) if var is None else var + v.reshape(B, C, -1)
    return var


def full_variances(post: KronPosterior, proj, deltas: torch.Tensor) -> torch.Tensor:
    """``J Sigma J^T`` [B, C, C, K] of one batch's projections for each row of ``deltas`` [K, L] (as
    :func:`diag_variances`, every pair of choices)."""
    var = None
    for li, ((Mt, inner), lam, full) in enumerate(zip(proj, post.lam, post.full)):
        B, C = Mt.shape[:2]
        d = deltas[:, li].to(torch.float64)
        coef = 1.0 / (lam.reshape(-1, 1) + d) - (0.0 if full else 1.0 / d)              # [P_l, K]
        M = Mt.double().reshape(B, C, -1)
        v = torch.einsum("bcp,bdp,pk->bcdk", M, M, coef)
        if inner is not None:
            v = v + inner.double().unsqueeze(-1) / d
        var = v if var is None else var + v
    return var


def mc_nll(f_mu: torch.Tensor, fvar: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, mask=None) -> torch.Tensor:
    """Summed NLL [K] of the mc predictive (probabilities averaged over the logit draws) for logits ``f_mu``
    [B, C], covariances ``fvar`` [B, C, C, K] and standard-normal draws ``eps`` [S, B, C] shared by the K."""
    out = []
    for k in range(fvar.shape[-1]):
        p, _ = glm_predictive(f_mu, fvar[..., k], "mc", n_samples=eps.shape[0], mask=mask, eps=eps)
        out.append(-torch.log(p.gather(1, y.reshape(-1, 1)).clamp(min=1e-12)).sum())
    return torch.stack(out)


def probit_nll(f_mu: torch.Tensor, var: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
    """Summed NLL [K] of the probit predictive for logits ``f_mu`` [B, C] and logit variances [B, C, K]."""
    z = f_mu.double().unsqueeze(-1) / torch.sqrt(1.0 + math.pi / 8 * var.clamp(min=0))
    if mask is not None:
        z = z.masked_fill(~mask.bool().unsqueeze(-1), -math.inf)
    logp = torch.log_softmax(z, dim=1).clamp(min=math.log(1e-12))
    return -logp.gather(1, y.reshape(-1, 1, 1).expand(-1, 1, z.shape[-1])).sum((0, 1))


def candidate_grid(grid: list[float]) -> list[float]:
    """The grid and every value its widening may reach (by its end steps, up to ``GRID_LIMITS``)."""
    grid = sorted(float(g) for g in grid)
    if not grid or any(g <= 0 or not math.isfinite(g) for g in grid):
        raise UqloraError(f"method.prior.grid values must be finite and > 0, got {grid}")
    return _extend(grid, "low", 10 ** 6) + grid + _extend(grid, "high", 10 ** 6)


def select_on_grid(grid: list[float], scores: list[float]) -> tuple[float, str | None]:
    """``(best value, "low" | "high" | None)``: the grid value with the lowest score and whether it is the
    grid's lowest or highest value (ties go to the first)."""
    i = min(range(len(grid)), key=scores.__getitem__)
    return grid[i], ("low" if i == 0 else "high" if i == len(grid) - 1 else None)


def _extend(grid: list[float], side: str, n: int = 4) -> list[float]:
    """Up to ``n`` more values beyond the ``side`` end of a sorted grid, log-spaced by the grid's step at
    that end (10 for a one-value grid), none beyond ``GRID_LIMITS``."""
    step = (grid[1] / grid[0] if side == "low" else grid[-1] / grid[-2]) if len(grid) > 1 else 10.0
    if side == "low":
        k = min(n, int(math.floor(math.log(grid[0] / GRID_LIMITS[0]) / math.log(step) + 1e-9)))
        return [grid[0] / step ** j for j in range(k, 0, -1)]
    k = min(n, int(math.floor(math.log(GRID_LIMITS[1] / grid[-1]) / math.log(step) + 1e-9)))
    return [grid[-1] * step ** j for j in range(1, k + 1)]


def grid_search(score, grid: list[float]) -> tuple[float, dict[float, float], str | None]:
    """Minimise ``score(value)`` over ``grid``, widening it while the best value is on an end (see the module
    docstring). Returns ``(best, {value: score} of every value tried, "low" | "high" | None)``."""
    cands = candidate_grid(grid)  # checks the values; the widenings are taken from it, 4 values at a time
    grid = sorted(float(g) for g in grid)
    scores = {g: float(score(g)) for g in grid}
    while True:
        keys = sorted(scores)
        best, edge = select_on_grid(keys, [scores[k] for k in keys])
        more = ([c for c in cands if c < keys[0]][-4:] if edge == "low" else
                [c for c in cands if c > keys[-1]][:4] if edge == "high" else [])
        if not more:
            return best, scores, edge
        log.info("Laplace prior: the best value %.3g is on the %s end of the grid; widening it to %.3g",
                 best, edge, more[0] if edge == "low" else more[-1])
        scores.update({g: float(score(g)) for g in more})


def tune_val_nll(post: KronPosterior, batches, grid: list[float], search: str = "grid",
                 structure: str = "scalar", steps: int = 300, lr: float = 0.1, link: str = "probit",
                 n_samples: int = 100, seed: int = 0) -> dict:
    """Set ``post.prior_precision`` by the held-out NLL of the ``link`` predictive (module docstring; mc:
    ``n_samples`` draws from ``seed``) over ``batches``, an iterable of
    ``(f_mu, projections, labels, mask)`` read once; returns what was measured: ``val_nll_grid`` ({value:
    NLL} of every value tried), ``val_nll`` (at the chosen prior) and ``prior_at_edge`` (the side of a best
    grid value that stayed on the widened grid's end, or None)."""
    L = len(post.names)
    if search not in ("grid", "gradient"):
        raise UqloraError(f"unknown method.prior.search '{search}'; valid choices: grid, gradient")
    if search == "grid" and structure != "scalar":
        raise UqloraError("method.prior.structure=layerwise needs prior.search=gradient (a grid covers one scalar)")
    cands = candidate_grid(grid)
    if search == "grid" and link in ("probit", "mc"):  # stream: the variances of every candidate, nothing cached
        rows = torch.tensor(cands, dtype=torch.float64).unsqueeze(1).expand(len(cands), L)
        tot, n = torch.zeros(len(cands), dtype=torch.float64), 0
        gen = torch.Generator().manual_seed(int(seed))
        for f_mu, proj, y, mask in batches:
            if link == "probit":
                tot += probit_nll(f_mu, diag_variances(post, proj, rows), y, mask)
            else:
                eps = torch.randn((int(n_samples),) + tuple(f_mu.shape), generator=gen, dtype=torch.float64)
                tot += mc_nll(f_mu, full_variances(post, proj, rows), y, eps, mask)
            n += y.numel()
        table = dict(zip(cands, (tot / max(n, 1)).tolist()))
        best, scores, edge = grid_search(table.__getitem__, grid)
        post.prior_precision = best
        return _edge_report({"val_nll_grid": {str(g): scores[g] for g in sorted(scores)}, "prior_at_edge": edge,
                             "val_nll": table[best]}, best)
    cache = list(batches)
    nll = lambda delta: predictive_nll(post, cache, delta, link, n_samples, seed)  # noqa: E731
    best, scores, edge = grid_search(lambda g: nll(torch.full((L,), g, dtype=torch.float64)), grid)
    post.prior_precision = best
    if search == "gradient":
        n = 1 if structure == "scalar" else L
        log_d = torch.full((n,), math.log(best), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([log_d], lr=float(lr))
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = nll(log_d.exp().expand(L))
            loss.backward()
            opt.step()
        post.prior_precision = log_d.detach().exp()
    return _edge_report({"val_nll_grid": {str(g): scores[g] for g in sorted(scores)}, "prior_at_edge": edge,
                         "val_nll": float(nll(post.prior_precision))}, best)


def _edge_report(info: dict, best: float) -> dict:
    if info["prior_at_edge"]:
        log.warning("Laplace prior: the validation NLL is lowest at the %s end of the widened grid (%.3g, limit "
                    "%.3g): the prior precision is not resolved", info["prior_at_edge"], best,
                    GRID_LIMITS[0 if info["prior_at_edge"] == "low" else 1])
    return info


def tune_marglik(post: KronPosterior, steps: int = 300, lr: float = 0.1) -> dict:
    """Set ``post.prior_precision`` by the evidence; returns ``marglik_converged`` (the evidence changed by
    less than 1e-3 over the last 10% of the steps) and ``prior_at_edge`` ("low" / "high" when a precision
    left [1e-6, 1e6], else None), each also logged as a warning when it fails."""
    trace = post.optimize_marglik(steps=int(steps), lr=float(lr))
    tail = trace[-max(2, len(trace) // 10):]
    converged = bool(abs(tail[-1] - tail[0]) < 1e-3)
    d = post.prior_precision
    edge = "low" if float(d.min()) < EXTREME[0] else "high" if float(d.max()) > EXTREME[1] else None
    if not converged:
        log.warning("Laplace prior: the evidence was still changing after %d Adam steps (by %.3g over the last "
                    "%d); raise method.prior.steps", len(trace), tail[-1] - tail[0], len(tail))
    if edge:
        log.warning("Laplace prior: the evidence drives the prior precision to %.3g, outside [%g, %g]",
                    float(d.min() if edge == "low" else d.max()), *EXTREME)
    return {"marglik_converged": converged, "prior_at_edge": edge}
