"""Uncertainty-aware label smoothing (UAL, Wang et al. 2024): per-example smoothing values from per-example
uncertainties (the mapping of the authors' ``make_score_dist``: scale to the target mean, clip at the cap,
repeat until the mean is within 1e-3; where the authors' loop would never end -- too few examples with u > 0
to reach the mean under the cap -- this raises)."""
from __future__ import annotations

import numpy as np

from uqlora.errors import UqloraError

MAPPINGS = ("mean_scaled", "linear")


def map_uncertainty(u: np.ndarray, mapping: str, eps_mean: float = 0.1, eps_cap: float = 0.99,
                    eps_min: float = 0.0, eps_max: float = 0.3) -> np.ndarray:
    """Per-example smoothing from uncertainties in [0, 1] (see the module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    if u.size == 0 or not np.isfinite(u).all() or u.min() < 0 or u.max() > 1:
        raise UqloraError("UAL uncertainties must be finite values in [0, 1]")
    if mapping == "linear":
        if not 0.0 <= eps_min <= eps_max < 1.0:
            raise UqloraError(f"method.eps_min/eps_max must satisfy 0 <= eps_min <= eps_max < 1, got {eps_min}, {eps_max}")
        return eps_min + (eps_max - eps_min) * u
    if mapping != "mean_scaled":
        raise UqloraError(f"unknown method.mapping '{mapping}'; valid choices: {', '.join(MAPPINGS)}")
    if not 0.0 <= eps_mean <= eps_cap < 1.0:
        raise UqloraError(f"method.eps_mean/eps_cap must satisfy 0 <= eps_mean <= eps_cap < 1, got {eps_mean}, {eps_cap}")
    if eps_mean == 0.0:
        return np.zeros_like(u)
    if u.mean() <= 0:  # no example is uncertain: nothing to rank by, smooth uniformly
        return np.full_like(u, eps_mean)
    eps = u.copy()
    for _ in range(1000):
        eps = np.minimum(eps / eps.mean() * eps_mean, eps_cap)
        if abs(eps.mean() - eps_mean) < 1e-3:
            return eps
    raise UqloraError(f"UAL: no smoothing values with mean method.eps_mean={eps_mean} under the cap "
                      f"method.eps_cap={eps_cap}: only {int((u > 0).sum())} of {u.size} examples have u > 0 "
                      f"(the mean reachable is {eps_cap * (u > 0).mean():.3g}); lower eps_mean or raise eps_cap")
