"""The Kronecker-factored Laplace posterior over LoRA (+ head) weights and its predictives.

Per layer l (weights W_l, [out, in], bias as an extra column) with KFAC factors from
:mod:`uqlora.core.kfac` and eigendecompositions ``A = Q_a diag(a) Q_a^T``, ``G = Q_g diag(g) Q_g^T`` (a
low-rank factor has k < dim columns; its orthogonal complement has eigenvalue 0):

    posterior precision   P_l = (1/N) G (x) A + delta_l I          (block-diagonal over layers)
    eigenvalues           lam_l = g a^T / N   on span(Q_g (x) Q_a),   0 on the rest
    P_l^{-1}              = (1/delta_l) I + (Q_g (x) Q_a) diag(1/(lam + delta_l) - 1/delta_l) (Q_g (x) Q_a)^T
                            (the 1/delta term is absent when both factors are full rank)

so covariances are never formed: for a Jacobian matrix J (one logit w.r.t. W_l, shaped like W_l),
``vec(J)^T P^{-1} vec(J') = <J, J'>/delta + sum(coef * (Q_g^T J Q_a) * (Q_g^T J' Q_a))``.

Log marginal likelihood (evidence) of the prior precision, as in Immer et al. / laplace-torch:

    log p(D | delta) ~= log p(D | theta*) - 1/2 [ log det P - log det P_0 ] - 1/2 sum_l delta_l ||theta*_l - mu_l||^2
    log det P - log det P_0 = sum_l sum_{lam in lam_l} log(1 + lam / delta_l)

(the scatter term uses *squared* norms; the prior is N(mu_l, delta_l^{-1} I) with mu_l = 0 except for the
answer rows of an ``lm_choices`` head, where mu_l = the pretrained LM-head rows they start from:
:func:`uqlora.core.kfac.head_prior_mean`).

Predictives (linearised GLM: f ~ N(f(x; theta*), J Sigma J^T)):
* ``probit``: softmax(f_mu / sqrt(1 + pi/8 * diag f_var));
* ``mc``: n logit samples f_mu + L eps, average of the *probabilities* (never of the logits);
* ``bridge``: the Laplace bridge (Hobbhahn et al. 2022) to a Dirichlet, whose mean is returned;
and the NN-sampling predictive: weights theta* + P^{-1/2} z, the softmax averaged over the draws.
"""
from __future__ import annotations

import logging
import math

import torch

from uqlora.core.kron_factor import stable_eigh
from uqlora.errors import UqloraError

log = logging.getLogger(__name__)
LINKS = ("probit", "mc", "bridge")


class KronPosterior:
    def __init__(self, names: list[str], shapes: list[tuple[int, int]], eigs: list[tuple], theta: list[torch.Tensor],
                 n_data: int, log_lik: float, prior_precision: float | torch.Tensor = 1.0,
                 structure: str = "scalar", prior_mean: list | None = None):
        if structure not in ("scalar", "layerwise"):
            raise UqloraError(f"unknown method.prior.structure '{structure}'; valid choices: scalar, layerwise")
        self.names, self.shapes, self.structure = list(names), [tuple(s) for s in shapes], structure
        self.Qa = [e[0] for e in eigs]
        self.la = [e[1] for e in eigs]
        self.Qg = [e[2] for e in eigs]
        self.lg = [e[3] for e in eigs]
        self.theta = [t.detach().to(torch.float64) for t in theta]
        mean = list(prior_mean) if prior_mean is not None else [None] * len(self.theta)
        if len(mean) != len(self.theta):
            raise UqloraError(f"prior mean has {len(mean)} entries for {len(self.theta)} layers")
        self.prior_mean = [None if m is None else m.detach().to(torch.float64).reshape(t.shape).to(t.device)
                           for m, t in zip(mean, self.theta)]
        self.n_data, self.log_lik = int(n_data), float(log_lik)
        self.lam = [torch.outer(g, a) / self.n_data for a, g in zip(self.la, self.lg)]
        self.full = [q_a.shape[1] == s[1] and q_g.shape[1] == s[0]
                     for q_a, q_g, s in zip(self.Qa, self.Qg, self.shapes)]
        self.prior_precision = prior_precision

    @classmethod
    def from_kfac(cls, result, prior_precision: float = 1.0, structure: str = "scalar") -> "KronPosterior":
        eigs = []
        for lay in result.layers:
            q_a, l_a = lay.A.eig()
            q_g, l_g = lay.G.eig()
            eigs.append((q_a, l_a, q_g, l_g))
        return cls([lay.name for lay in result.layers], [lay.shape for lay in result.layers], eigs,
                   [lay.matrix() for lay in result.layers], result.n_data, result.log_lik, prior_precision, structure,
                   [getattr(lay, "prior_mean", None) for lay in result.layers])

    # --- prior precision ------------------------------------------------------------------------------
    @property
    def prior_precision(self) -> torch.Tensor:
        return self._delta

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        d = torch.as_tensor(value, dtype=torch.float64).flatten().detach().clone()
        if d.numel() == 1:
            d = d.expand(len(self.names)).clone()
        if d.numel() != len(self.names):
            raise UqloraError(f"prior precision has {d.numel()} values for {len(self.names)} layers")
        if not torch.isfinite(d).all() or (d <= 0).any():
            raise UqloraError(f"prior precision must be finite and > 0, got {d.tolist()[:4]}")
        self._delta = d

    @property
    def num_params(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def memory_floats(self) -> int:
        """Floats held by the posterior (eigenvectors + eigenvalues), excluding the MAP weights."""
        return sum(q.numel() + l.numel() for q, l in zip(self.Qa + self.Qg, self.la + self.lg))

    # --- evidence ---------------------------------------------------------------------------------------
    def log_det_ratio(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        delta = self._delta if delta is None else delta
        return sum(torch.log1p(lam / d).sum() for lam, d in zip(self.lam, delta.expand(len(self.lam))))

    def sq_dist(self) -> list[torch.Tensor]:
        """Per layer ``||theta*_l - mu_l||^2`` (the squared distance of the MAP from the prior mean)."""
        return [((t if m is None else t - m) ** 2).sum() for t, m in zip(self.theta, self.prior_mean)]

    def scatter(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        delta = self._delta if delta is None else delta
        return sum(d * q for q, d in zip(self.sq_dist(), delta.expand(len(self.theta))))

    def log_marginal_likelihood(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_lik - 0.5 * (self.log_det_ratio(delta) + self.scatter(delta))

    def log_det_posterior_precision(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        delta = self._delta if delta is None else delta
        out = torch.zeros((), dtype=torch.float64)
        for lam, d, (o, i) in zip(self.lam, delta.expand(len(self.lam)), self.shapes):
            out = out + torch.log(lam + d).sum() + (o * i - lam.numel()) * torch.log(d)
        return out

    def optimize_marglik(self, steps: int = 300, lr: float = 0.1, init: float | None = None) -> list[float]:
        """Maximise the evidence over log delta (one value, or one per layer) with Adam; returns the trace."""
        n = 1 if self.structure == "scalar" else len(self.names)
        start = self._delta.log() if init is None else torch.full((len(self.names),), math.log(init), dtype=torch.float64)
        log_d = (start[:1] if n == 1 else start).clone().requires_grad_(True)
        opt = torch.optim.Adam([log_d], lr=lr)
        trace = []
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = -self.log_marginal_likelihood(log_d.exp().expand(len(self.names)))
            loss.backward()
            opt.step()
            trace.append(-loss.item())
        self.prior_precision = log_d.detach().exp()
        return trace

    # --- GLM predictive -----------------------------------------------------------------------------------
    def project(self, jacs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer, from Jacobians ``J [B, C, out, in]``: ``(Q_g^T J Q_a [B, C, k_g, k_a],
        <J_c, J_c'> [B, C, C] or None when the layer's factors are full rank)``. Independent of delta."""
        out = []
        for J, q_a, q_g, full in zip(jacs, self.Qa, self.Qg, self.full):
            Mt = q_g.T.to(J.dtype) @ J @ q_a.to(J.dtype)
            inner = None if full else torch.einsum("bcoi,bdoi->bcd", J, J).double()
            out.append((Mt, inner))
        return out

    def functional_variance(self, proj, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``f_var [B, C, C] = J Sigma J^T`` from :meth:`project`'s output."""
        delta = self._delta if delta is None else delta
        fvar = None
        for (Mt, inner), lam, d, full in zip(proj, self.lam, delta.expand(len(self.lam)), self.full):
            coef = 1.0 / (lam + d) - (0.0 if full else 1.0 / d)
            Mt = Mt.double()
            term = torch.einsum("bcij,bdij,ij->bcd", Mt, Mt, coef)
            if inner is not None:
                term = term + inner / d
            fvar = term if fvar is None else fvar + term
        return fvar

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``n`` weight draws per layer ``[n, out, in]`` from N(theta*, P^{-1})."""
        draws = []
        for t, q_a, q_g, lam, d, full in zip(self.theta, self.Qa, self.Qg, self.lam, self._delta, self.full):
            z = torch.randn((n,) + tuple(t.shape), generator=generator, dtype=torch.float64)
            coef = 1.0 / torch.sqrt(lam + d) - (0.0 if full else 1.0 / torch.sqrt(d))
            core = q_g.T @ z @ q_a
            dz = q_g @ (coef * core) @ q_a.T
            if not full:
                dz = dz + z / torch.sqrt(d)
            draws.append(t + dz)
        return draws

    # --- dense (tests, small models only) -------------------------------------------------------------------
    def dense_covariance(self) -> torch.Tensor:
        blocks = []
        for q_a, q_g, lam, d, (o, i) in zip(self.Qa, self.Qg, self.lam, self._delta, self.shapes):
            Q = torch.kron(q_g.contiguous(), q_a.contiguous())
            P = Q @ torch.diag(lam.flatten()) @ Q.T + d * torch.eye(o * i, dtype=torch.float64)
            blocks.append(torch.linalg.inv(P))
        return torch.block_diag(*blocks)

    # --- persistence ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "structure": self.structure,
                "Qa": list(self.Qa), "la": list(self.la), "Qg": list(self.Qg), "lg": list(self.lg),
                "theta": list(self.theta), "n_data": self.n_data, "log_lik": self.log_lik,
                "prior_precision": self._delta.clone(), "prior_mean": list(self.prior_mean)}

    def load_state_dict(self, s: dict) -> None:
        self.__dict__.update(KronPosterior.from_state_dict(s).__dict__)

    @classmethod
    def from_state_dict(cls, s: dict) -> "KronPosterior":
        eigs = list(zip(s["Qa"], s["la"], s["Qg"], s["lg"]))
        return cls(s["names"], [tuple(x) for x in s["shapes"]], eigs, s["theta"], s["n_data"], s["log_lik"],
                   s["prior_precision"], s.get("structure", "scalar"), s.get("prior_mean"))


def _sqrtm_psd(f_var: torch.Tensor) -> torch.Tensor:
    lam, Q = stable_eigh(0.5 * (f_var + f_var.transpose(-1, -2)), "GLM predictive covariance")
    return Q * lam.clamp(min=0).sqrt().unsqueeze(-2)


def example_draws(index: torch.Tensor, n_samples: int, n_classes: int, seed: int) -> torch.Tensor:
    """Standard-normal draws ``[S, B, C]`` of the mc link, one generator per example seeded by ``(seed, the
    example's position in its split)``: an example gets the same draws whatever its batch, the batch order or
    the number of processes predicting."""
    if n_samples < 1:
        raise UqloraError(f"method.num_samples must be >= 1, got {n_samples}")
    gens = (torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i)) for i in index.reshape(-1).tolist())
    return torch.stack([torch.randn(n_samples, n_classes, generator=g, dtype=torch.float64) for g in gens], 1)


def glm_predictive(f_mu: torch.Tensor, f_var: torch.Tensor, link: str = "probit", n_samples: int = 100,
                   generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
                   eps: torch.Tensor | None = None):
    """``(probs [B, C], samples [S, B, C] | None)`` of the linearised predictive; masked (padded) choices
    keep probability 0. ``mc`` returns its per-sample probabilities too; its standard-normal draws are
    ``eps`` [S, B, C] when given (common random numbers), else drawn from ``generator``."""
    f_mu, f_var = f_mu.double(), f_var.double()
    valid = torch.ones_like(f_mu, dtype=torch.bool) if mask is None else mask.bool()
    if link == "probit":
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8 * torch.diagonal(f_var, dim1=-2, dim2=-1).clamp(min=0))
        z = (kappa * f_mu).masked_fill(~valid, -math.inf)
        return torch.softmax(z, -1), None
    if link == "mc":
        if n_samples < 1:
            raise UqloraError(f"method.num_samples must be >= 1, got {n_samples}")
        L = _sqrtm_psd(f_var)
        if eps is None:
            eps = torch.randn((n_samples,) + tuple(f_mu.shape), generator=generator, dtype=torch.float64)
        eps = eps.to(device=f_mu.device, dtype=torch.float64)
        f = f_mu + torch.einsum("bij,sbj->sbi", L, eps)
        samples = torch.softmax(f.masked_fill(~valid, -math.inf), -1)
        return samples.mean(0), samples
    if link == "bridge":
        # restricted to the valid choices; the Gaussian is first projected onto sum(f) = 0 (the
        # zero-mean correction of Hobbhahn et al.), then mapped to a Dirichlet whose mean is returned
        vm = valid.double()
        mu = f_mu.masked_fill(~valid, 0.0)
        var = f_var * vm.unsqueeze(-1) * vm.unsqueeze(-2)
        tot = var.sum((-1, -2)).clamp(min=1e-30).unsqueeze(-1)
        mu = mu - var.sum(-1) * mu.sum(-1, keepdim=True) / tot
        var = var - torch.einsum("bi,bj->bij", var.sum(-1), var.sum(-2)) / tot.unsqueeze(-1)
        d = torch.diagonal(var, dim1=-2, dim2=-1).clamp(min=1e-12)
        K = vm.sum(-1, keepdim=True)
        sum_exp = (torch.exp(-mu) * vm).sum(-1, keepdim=True)
        alpha = ((1 - 2 / K + mu.exp() / K ** 2 * sum_exp) / d) * vm
        return torch.nan_to_num(alpha / alpha.sum(-1, keepdim=True), nan=1.0 / f_mu.shape[-1]), None
    raise UqloraError(f"unknown method.link '{link}'; valid choices: {', '.join(LINKS)}")
