"""Prior precision of the Kronecker-factored Laplace posterior (:class:`uqlora.core.laplace.KronPosterior`).

* ``marglik`` (:func:`tune_marglik`): maximise the log evidence over log delta (one value, or one per layer)
  with Adam (:meth:`KronPosterior.optimize_marglik`); warns when it has not converged or runs to an extreme.
* ``val_nll`` (:func:`tune_val_nll`): minimise the predictive NLL on held-out data, first over a grid of
  scalar values -- *widened* by the grid's own end step while the best value is on an end of the grid, up
  to ``[GRID_LIMITS]``; a best value still on an end is reported (``at_edge``) and logged as a warning --
  then, with ``search="gradient"``, by Adam on log delta from the grid's best value.

The held-out NLL is computed from cached per-batch GLM terms (:func:`predictive_nll`): ``(f_mu [B, C],
projections of the Jacobians (KronPosterior.project), labels [B], choice mask or None)``, so every prior
value costs a few small tensor contractions, not a pass over the data.
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


def predictive_nll(post: KronPosterior, cache: list, delta: torch.Tensor, link: str = "probit") -> torch.Tensor:
    """Mean NLL of the GLM predictive with prior precision ``delta`` [L] over the cached batches."""
    tot, n = 0.0, 0
    for f_mu, proj, y, mask in cache:
        p, _ = glm_predictive(f_mu, post.functional_variance(proj, delta), link, mask=mask)
        tot = tot - torch.log(p.gather(1, y.unsqueeze(1)).clamp(min=1e-12)).sum()
        n += y.numel()
    return tot / n


def select_on_grid(grid: list[float], scores: list[float]) -> tuple[float, str | None]:
    """``(best value, "low" | "high" | None)``: the grid value with the lowest score and whether it is the
    grid's lowest or highest value (ties go to the first)."""
    i = min(range(len(grid)), key=scores.__getitem__)
    return grid[i], ("low" if i == 0 else "high" if i == len(grid) - 1 else None)


def _extend(grid: list[float], side: str, n: int = 4) -> list[float]:
    """``n`` more values beyond the ``side`` end of a sorted grid, log-spaced by the grid's step at that end."""
    if side == "low":
        step = grid[1] / grid[0] if len(grid) > 1 else 10.0
        return [grid[0] / step ** k for k in range(n, 0, -1) if grid[0] / step ** k >= GRID_LIMITS[0]]
    step = grid[-1] / grid[-2] if len(grid) > 1 else 10.0
    return [grid[-1] * step ** k for k in range(1, n + 1) if grid[-1] * step ** k <= GRID_LIMITS[1]]


def grid_search(score, grid: list[float]) -> tuple[float, dict[float, float], str | None]:
    """Minimise ``score(value)`` over ``grid``, widening it while the best value is on an end (see the module
    docstring). Returns ``(best, {value: score} of every value tried, "low" | "high" | None)``."""
    grid = sorted(float(g) for g in grid)
    if not grid or any(g <= 0 or not math.isfinite(g) for g in grid):
        raise UqloraError(f"method.prior.grid values must be finite and > 0, got {grid}")
    scores = {g: float(score(g)) for g in grid}
    while True:
        keys = sorted(scores)
        best, edge = select_on_grid(keys, [scores[k] for k in keys])
        more = _extend(keys, edge) if edge else []
        if not more:
            return best, scores, edge
        log.info("Laplace prior: the best value %.3g is on the %s end of the grid; widening it to %.3g",
                 best, edge, more[0] if edge == "low" else more[-1])
        scores.update({g: float(score(g)) for g in more})


def tune_val_nll(post: KronPosterior, cache: list, grid: list[float], search: str = "grid",
                 structure: str = "scalar", steps: int = 300, lr: float = 0.1, link: str = "probit") -> dict:
    """Set ``post.prior_precision`` by the held-out NLL (module docstring); returns what was measured:
    ``val_nll_grid`` ({value: NLL}), ``val_nll`` (at the chosen prior) and ``prior_at_edge`` (the side of
    a best grid value that stayed on the widened grid's end, or None)."""
    L = len(post.names)
    if search not in ("grid", "gradient"):
        raise UqloraError(f"unknown method.prior.search '{search}'; valid choices: grid, gradient")
    if search == "grid" and structure != "scalar":
        raise UqloraError("method.prior.structure=layerwise needs prior.search=gradient (a grid covers one scalar)")
    best, scores, edge = grid_search(lambda g: predictive_nll(post, cache, torch.full((L,), g, dtype=torch.float64),
                                                              link), grid)
    if edge:
        log.warning("Laplace prior: the validation NLL is lowest at the %s end of the widened grid (%.3g, limit "
                    "%.3g): the prior precision is not resolved", edge, best, GRID_LIMITS[0 if edge == "low" else 1])
    post.prior_precision = best
    if search == "gradient":
        n = 1 if structure == "scalar" else L
        log_d = torch.full((n,), math.log(best), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([log_d], lr=float(lr))
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = predictive_nll(post, cache, log_d.exp().expand(L), link)
            loss.backward()
            opt.step()
        post.prior_precision = log_d.detach().exp()
    return {"val_nll_grid": {str(g): scores[g] for g in sorted(scores)}, "prior_at_edge": edge,
            "val_nll": float(predictive_nll(post, cache, post.prior_precision, link))}


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
