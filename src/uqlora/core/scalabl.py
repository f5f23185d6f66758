"""ScalaBL (Samplawski et al., UAI 2025): variational inference in the r-dimensional subspace of each LoRA layer.

LoRA's A is parameterised as A = diag(s) V^T (``Vh``, r x in, trained) with s = exp(log_s); only the r singular
values are stochastic: q(s) = N(exp(log_s), sigma_s^2), sigma_s = exp(log_s_sigma), prior p(s) = N(0, 1).
Initialisation as the official code (SRI-CSL/BayesAdapt): the SVD A0 = U diag(s0) Vh of a freshly Kaiming-
initialised A0 (peft's own lora_A init), U dropped (B = 0 at init, so the function is unchanged), sigma_s ~
U[eps / sqrt 2, eps].

The KL is KL(q || p), the ELBO's direction. (The official ``ScalaBLLinear.kl_div`` evaluates KL(p || q):
:func:`reverse_kl` keeps that formula for comparison.)

The layer's forward (a hook on peft's ``lora_A``, see :class:`uqlora.core.blob.LoRANoise`) replaces A x by
(Vh x) * s_tilde with s_tilde = s (mean), s + sigma_s * e (a fixed draw e) or, in train mode, one draw of e
per forward shared by the batch (the official code) -- with ``flipout``, times per-token random signs.
peft's ``lora_A.weight`` is frozen and unused while the hooks are on.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from uqlora.core.blob import LoRANoise, _load_list, _signs, gaussian_kl
from uqlora.errors import UqloraError


class ScalaBL(LoRANoise):
    train_noise = True

    def __init__(self, layers, eps: float = 0.05, prior_mean: float = 0.0, prior_std: float = 1.0,
                 flipout: bool = False, generator: torch.Generator | None = None):
        super().__init__(layers)
        if not eps > 0 or not prior_std > 0:
            raise UqloraError(f"ScalaBL needs eps > 0 and prior_std > 0, got eps={eps}, prior_std={prior_std}")
        self.prior_mean, self.prior_std, self.flipout = float(prior_mean), float(prior_std), bool(flipout)
        self.log_s, self.Vh, self.log_s_sigma = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for i in range(len(self)):
            w = self.lora_A(i).weight
            r, d_in = w.shape
            if d_in < r:
                raise UqloraError(f"ScalaBL: LoRA layer '{self.names[i]}' has rank {r} > input width {d_in}")
            _, s, Vh = torch.linalg.svd(w.detach().double().cpu(), full_matrices=False)
            sig = torch.empty(r, dtype=torch.float64).uniform_(eps / math.sqrt(2), eps, generator=generator)
            for plist, t in ((self.log_s, s.log()), (self.Vh, Vh), (self.log_s_sigma, sig.log())):
                plist.append(nn.Parameter(t.to(device=w.device, dtype=w.dtype)))
            w.requires_grad_(False)

    def s(self, i: int) -> torch.Tensor:
        return self.log_s[i].exp()

    def sigma(self, i: int) -> torch.Tensor:
        return self.log_s_sigma[i].exp()

    def mean_weight(self, i: int) -> torch.Tensor:
        """The mean A = diag(s) Vh [r, in]."""
        return self.s(i).unsqueeze(1) * self.Vh[i]

    def noise_shape(self, i):
        return (self.log_s[i].shape[0],)

    def _project(self, i, x):
        return x @ self.Vh[i].to(x.dtype).t()

    def mean_output(self, i, x, out):
        return self._project(i, x) * self.s(i).to(x.dtype)

    def train_output(self, i, x, out):
        z = self._project(i, x)
        sigma = self.sigma(i)
        noise = z * (sigma * torch.randn_like(sigma)).to(z.dtype)
        if self.flipout:
            noise = noise * _signs(noise.shape, noise)
        return z * self.s(i).to(z.dtype) + noise

    def draw_output(self, i, x, out, e):
        return self._project(i, x) * (self.s(i) + self.sigma(i) * e.to(self.sigma(i).dtype)).to(x.dtype)

    def kl(self) -> torch.Tensor:
        """KL(q(s) || p(s)) summed over the singular values of every layer (float64)."""
        return sum(gaussian_kl(self.s(i), self.sigma(i), self.prior_mean, self.prior_std) for i in range(len(self)))

    def reverse_kl(self) -> torch.Tensor:
        """KL(p || q): the direction the official code computes (not used for training)."""
        return sum(gaussian_kl(torch.full_like(self.s(i), self.prior_mean), torch.full_like(self.s(i), self.prior_std),
                               self.s(i), self.sigma(i)) for i in range(len(self)))

    def kl_parameters(self) -> list[nn.Parameter]:
        return list(self.log_s) + list(self.log_s_sigma)

    def variational_parameters(self) -> list[nn.Parameter]:
        return list(self.log_s) + list(self.Vh) + list(self.log_s_sigma)

    def state(self) -> dict:
        return {k: [p.detach().cpu().clone() for p in getattr(self, k)] for k in ("log_s", "Vh", "log_s_sigma")}

    def load_state(self, state: dict) -> None:
        for k in ("log_s", "Vh", "log_s_sigma"):
            _load_list(getattr(self, k), state.get(k), k, self.names)
