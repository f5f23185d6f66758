"""Gaussian perturbations of LoRA's A matrices (plain torch), and BLoB (Wang et al., NeurIPS 2024).

:class:`LoRANoise` puts a forward hook on the ``lora_A`` linear of every peft LoRA layer: the hook receives the
input lora_A sees (after LoRA dropout) and may replace lora_A's output ``A x`` [..., r]; peft then computes
``B (.) * scaling`` as usual. Adding a rank-space noise ``n`` there is exactly a perturbation of A:
``B (A + dA) x * scaling``. Three modes, chosen per forward:

* a fixed weight draw is set (:meth:`LoRANoise.use_draw`): ``dA_s`` from standard normals made once
  (:meth:`LoRANoise.draws`, a seeded CPU generator) -- the same weights for every token, batch and process;
* the layer is in train mode and the family trains with noise: flipout (Wen et al. 2018) -- one Gaussian
  matrix per forward, per-token random signs on the input and rank dimensions, from the global torch RNG
  (so the RNG state in the checkpoint makes a resumed run exact);
* otherwise the mean weights.

BLoB: q(A) = N(M, sigma^2) element-wise with sigma = rho^2, rho ~ U[eps / sqrt 2, eps] at init; B deterministic;
prior N(0, beta^2); the closed-form Gaussian KL; the KL weight pi_i = 2^i / (2^(M+1) - 1), i = 1..M cycling
over optimizer steps, computed in log space; M = int(100 N^(pi / gamma) / global batch).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from uqlora.errors import UqloraError

ADAPTER = "default"


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer whose ``lora_A['default']`` is a linear map, in module order."""
    out = []
    for name, m in model.named_modules():
        lora_A = getattr(m, "lora_A", None)
        if not (isinstance(lora_A, nn.ModuleDict) and ADAPTER in lora_A and isinstance(lora_A[ADAPTER], nn.Linear)):
            continue
        if getattr(m, "use_dora", {}).get(ADAPTER, False) or getattr(m, "merged", False):
            raise UqloraError(f"LoRA layer '{name}' is a DoRA or merged adapter; the Bayesian LoRA methods need "
                              "plain, unmerged LoRA (model.lora)")
        out.append((name, m))
    if not out:
        raise UqloraError("the model has no LoRA layers (model.lora.target_modules) for a Bayesian LoRA method")
    return out


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_mean=0.0, prior_std=1.0) -> torch.Tensor:
    """``sum_j KL(N(mu_j, sigma_j^2) || N(prior_mean, prior_std^2))`` in float64 (the direction of the ELBO)."""
    mu, sigma = mu.double(), sigma.double()
    m = torch.as_tensor(prior_mean, dtype=torch.float64, device=mu.device)
    s = torch.as_tensor(prior_std, dtype=torch.float64, device=mu.device)
    kl = torch.log(s) - torch.log(sigma.clamp_min(1e-30)) + (sigma ** 2 + (mu - m) ** 2) / (2 * s ** 2) - 0.5
    return kl.sum()


def kl_weight(step: int, cycle: int, reweighting: bool = True) -> float:
    """The KL weight of optimizer step ``step`` (0-based): i = step mod M + 1 and pi_i = 2^i / (2^(M+1) - 1),
    evaluated as exp((i - M - 1) log 2 - log1p(-2^-(M+1))) so that M in the thousands neither overflows nor
    loses precision (the weights of a cycle sum to (2^(M+1) - 2) / (2^(M+1) - 1)); 1 / M without
    ``reweighting``."""
    if int(cycle) < 1:
        raise ValueError(f"the KL cycle length M must be >= 1, got {cycle}")
    M = int(cycle)
    if not reweighting:
        return 1.0 / M
    i = int(step) % M + 1
    return math.exp((i - M - 1) * math.log(2.0) - math.log1p(-(2.0 ** -(M + 1))))


def kl_cycle_length(n_train: int, global_batch: int, gamma: float = 8.0) -> int:
    """M = int(100 N^(pi / gamma) / global batch) (BLoB's dataset rescaling), at least 1."""
    return max(1, int(100 * float(n_train) ** (math.pi / float(gamma)) / max(1, int(global_batch))))


def _signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(0.5).mul_(2).sub_(1)


def flipout(x: torch.Tensor, W: torch.Tensor, rank_signs_only: bool = False) -> torch.Tensor:
    """``((x * r) @ W^T) * s``: W [r, in] one perturbation, r (shaped like x) and s (like the output) independent
    +-1 per token. Each token sees a perturbation with the law of W (for W with independent symmetric entries)
    and two tokens' perturbations are uncorrelated. ``rank_signs_only``: s only (for W = diag(e) V)."""
    xr = x if rank_signs_only else x * _signs(x.shape, x)
    z = xr @ W.to(x.dtype).t()
    return z * _signs(z.shape, z)


class LoRANoise(nn.Module):
    """Hooks on the ``lora_A`` linears of ``layers`` (see the module docstring); subclasses say what the noise is.

    The layers stay owned by the model (kept in a plain list, not as submodules); this module holds only the
    variational parameters / buffers of its family."""

    train_noise = False  # flipout in train mode (families that are trained with noise)

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        super().__init__()
        self.names = [n for n, _ in layers]
        self._layers = [m for _, m in layers]
        self._draw: list[torch.Tensor] | None = None
        self._handles = [self.lora_A(i).register_forward_hook(functools.partial(self._hook, i))
                         for i in range(len(self._layers))]

    def lora_A(self, i: int) -> nn.Linear:
        return self._layers[i].lora_A[ADAPTER]

    def lora_B(self, i: int) -> nn.Linear:
        return self._layers[i].lora_B[ADAPTER]

    def __len__(self) -> int:
        return len(self._layers)

    def _hook(self, i: int, module: nn.Module, args, out: torch.Tensor):
        x = args[0]
        if self._draw is not None:
            return self.draw_output(i, x, out, self._draw[i])
        if module.training and self.train_noise:
            return self.train_output(i, x, out)
        return self.mean_output(i, x, out)

    # --- what a family overrides ------------------------------------------------------------------------
    def mean_output(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def train_output(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def draw_output(self, i: int, x: torch.Tensor, out: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noise_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.lora_A(i).weight.shape)

    # --- fixed weight draws (test time, generation, TFB's search) ------------------------------------------
    def draws(self, n: int, seed: int) -> list[list[torch.Tensor]]:
        """``n`` draws of standard normals, one tensor per layer (:meth:`noise_shape`), from a CPU generator
        seeded with ``seed`` (the same numbers on every device and process), placed on each layer's device."""
        g = torch.Generator().manual_seed(int(seed))
        out = []
        for _ in range(int(n)):
            out.append([torch.randn(self.noise_shape(i), generator=g).to(self.lora_A(i).weight.device)
                        for i in range(len(self))])
        return out

    @contextlib.contextmanager
    def use_draw(self, draw: list[torch.Tensor] | None):
        """Within the context every forward uses weight draw ``draw`` (None: the mean weights)."""
        prev = self._draw
        self._draw = draw
        try:
            yield
        finally:
            self._draw = prev

    def remove(self) -> None:
        """Take the hooks off the model (the model computes plain LoRA again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


class BLoB(LoRANoise):
    """BLoB's variational family over every LoRA A: mean = peft's ``lora_A.weight`` (trained as usual),
    std = rho^2 (``self.rho``, one tensor per layer), flipout in train mode."""

    train_noise = True

    def __init__(self, layers, eps: float = 0.05, beta: float = 0.2, generator: torch.Generator | None = None):
        super().__init__(layers)
        if not eps > 0 or not beta > 0:
            raise UqloraError(f"BLoB needs eps > 0 and beta > 0, got eps={eps}, beta={beta}")
        self.beta = float(beta)
        self.rho = nn.ParameterList()
        for i in range(len(self)):
            A = self.lora_A(i).weight
            rho = torch.empty(A.shape, dtype=torch.float32).uniform_(eps / math.sqrt(2), eps, generator=generator)
            self.rho.append(nn.Parameter(rho.to(device=A.device, dtype=A.dtype)))

    def std(self, i: int) -> torch.Tensor:
        return self.rho[i] ** 2

    def train_output(self, i, x, out):
        std = self.std(i)
        return out + flipout(x, std * torch.randn_like(std))

    def draw_output(self, i, x, out, e):
        return out + x @ (self.std(i) * e.to(self.std(i).dtype)).to(x.dtype).t()

    def kl(self) -> torch.Tensor:
        """KL(q || p) summed over every element of every A (float64)."""
        return sum(gaussian_kl(self.lora_A(i).weight, self.std(i), 0.0, self.beta) for i in range(len(self)))

    def kl_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A(i).weight for i in range(len(self))] + list(self.rho)

    def variational_parameters(self) -> list[nn.Parameter]:
        """The parameters of this module (not of the model): rho."""
        return list(self.rho)

    def state(self) -> dict:
        return {"rho": [p.detach().cpu().clone() for p in self.rho]}

    def load_state(self, state: dict) -> None:
        _load_list(self.rho, state.get("rho"), "rho", self.names)


def _load_list(params: nn.ParameterList, tensors, key: str, names: list[str]) -> None:
    if tensors is None or len(tensors) != len(params):
        raise UqloraError(f"the saved variational state has {0 if tensors is None else len(tensors)} '{key}' tensors, "
                          f"this model {len(params)} LoRA layers")
    for p, t, n in zip(params, tensors, names):
        if tuple(t.shape) != tuple(p.shape):
            raise UqloraError(f"the saved '{key}' of LoRA layer '{n}' has shape {tuple(t.shape)}, this model "
                              f"{tuple(p.shape)}: it was saved from a different model/LoRA config")
        with torch.no_grad():
            p.copy_(t.to(device=p.device, dtype=p.dtype))
