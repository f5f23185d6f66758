"""ScalaBL (Samplawski et al., UAI 2025): variational inference over the r singular values of each LoRA A
(A = diag(s) Vh, q(s) = N(exp(log_s), sigma_s^2), prior N(0, 1); :class:`uqlora.core.scalabl.ScalaBL`).

Training as the official code (SRI-CSL/BayesAdapt, ``VITrainer``): AdamW (``optim.*``) over LoRA B (+ head) and
log_s, Vh, log_s_sigma (no weight decay on these) on the NLL; after each AdamW step an SGD step with learning
rate ``kllr`` (0.2, times the warm-up/decay factor) on pi_t KL, with BLoB's cyclic weights pi_t. Difference:
the KL is KL(q || p); the official code evaluates KL(p || q). Training noise: one draw of the singular-value
perturbations per forward shared by the batch (official); ``flipout=true`` adds per-token rank signs.
Prediction, samples and state as :mod:`uqlora.methods.blob`; the adapter file holds LoRA B (+ head) only (A
is not a free parameter), the method state log_s, Vh and log_s_sigma.
"""
from __future__ import annotations

from dataclasses import dataclass

from uqlora.core.scalabl import ScalaBL
from uqlora.methods import register
from uqlora.methods.blob import BLoBMethod, VariationalConfig
from uqlora.schema import non_negative, positive


@dataclass
class ScalablConfig(VariationalConfig):
    name: str = "scalabl"
    display_name: str = "ScalaBL"
    prior_std: float = positive(1.0)  # prior N(0, prior_std^2) on the singular values
    kllr: float = non_negative(0.2)   # learning rate of the SGD step on the KL (BayesAdapt's conf/optim/vi.yaml)
    flipout: bool = False             # per-token random signs on the rank dimension during training


@register("scalabl", ScalablConfig)
class ScalaBLMethod(BLoBMethod):
    def build_noise(self, layers):
        return ScalaBL(layers, eps=float(self.mcfg.eps), prior_std=float(self.mcfg.prior_std),
                       flipout=bool(self.mcfg.flipout))

    def extra_parameters(self):
        return self.var.variational_parameters()

    def sgd_nll_parameters(self):
        return []
