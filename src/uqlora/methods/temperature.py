"""``method=temperature``: post-hoc temperature scaling (Guo et al. 2017) of a single model's predictive.

One scalar T > 0 is fitted by minimising the NLL on a held-out split (``method.split``: calib, the
default, or val; never train or test), see :mod:`uqlora.core.temperature`. The calibrated predictive is

    p_T = softmax(log p / T)

where p is the predictive of the underlying model. Two ways to get that model:

* ``method.map_run=null``: train LoRA MAP exactly as ``method=map`` (same seed -> same adapter), then fit
  T on its logits (log_softmax(logits) / T is logits / T up to a per-example constant: the classic
  logit temperature scaling).
* ``method.map_run=<run dir>``: no training; T is fitted on top of the predictive of ANY finished
  single-model run -- map, swag, laplace, mc_dropout, adue, ual, ... The orchestrator loads the run's adapter,
  rebuilds its method on the same backbone and loads its fitted state (:func:`uqlora.sources.attach_source`);
  that method and its state are saved inside ours, so ``eval.py`` needs only this run's directory.

Sampling methods (SWAG, MC dropout, Laplace with sampled links) are calibrated "pool, then calibrate":
T rescales the log of the pooled (sample-averaged) predictive. Their per-sample probabilities are dropped
from the output: each sample scaled separately would no longer average to the calibrated predictive, and
unscaled samples would describe the uncalibrated one. Other per-example outputs (AdUE's ``u_*`` scores)
are kept as the base method computed them. The argmax, hence the accuracy, is unchanged.

Saved state: ``{"temperature": tensor([T]), "tuning": {...}}`` (+ ``base`` and ``base_method_config`` when
a method other than MAP is wrapped).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from uqlora.core.temperature import apply_temperature, fit_temperature
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.posthoc import PostHocConfig, PostHocMethod
from uqlora.schema import Choice, at_least

log = logging.getLogger(__name__)


class FitSplit(Choice):
    calib = "calib"
    val = "val"


@dataclass
class TemperatureConfig(PostHocConfig):
    name: str = "temperature"
    display_name: str = "Temperature"
    split: FitSplit = FitSplit.calib  # split T is fitted on: calib | val (never train or test)
    max_iter: int = at_least(1, 100)  # L-BFGS iterations


@register("temperature", TemperatureConfig)
class TemperatureScaling(PostHocMethod):
    wraps_any = True           # on top of any finished single-model run's predictive (method.map_run)
    fit_split_key = "split"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.temperature = 1.0
        self.tuning: dict = {}

    # --- predictive -----------------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        out, log_p = self.base_outputs(batch, batch_idx, dataloader_idx)
        return {"probs": apply_temperature(log_p, self.temperature).float(), **out}

    def predictive(self, batch) -> torch.Tensor:
        return self.predict_step(batch, 0)["probs"]

    # free-text generation draws the base method's weights; a temperature does not apply to sampled text
    def num_weight_samples(self) -> int:
        return self.base.num_weight_samples() if self.base is not None else super().num_weight_samples()

    def weight_sample(self, s: int):
        return self.base.weight_sample(s) if self.base is not None else super().weight_sample(s)

    # --- fitting --------------------------------------------------------------------------------------------
    def calibration_log_probs(self, datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncalibrated log-probabilities [N, C] (float64, CPU) and labels [N] of a split, in eval mode."""
        log_ps, labels = [], []
        self.start_predict()
        try:
            for i, batch in enumerate(self.batches(datamodule.loader(split), f"temperature: predictive on {split}")):
                with torch.no_grad():
                    _, log_p = self.base_outputs(batch, i)
                log_ps.append(log_p.detach().double().cpu())
                labels.append(batch["labels"].cpu())
        finally:
            self.end_predict()
        return torch.cat(log_ps), torch.cat(labels)

    def fit(self, datamodule) -> None:
        split = self.fit_split
        log_p, labels = self.calibration_log_probs(datamodule, split)
        T, info = fit_temperature(log_p, labels, max_iter=int(self.mcfg.max_iter))
        self.temperature = T
        base = self.base.name if self.base is not None else "map"
        self.tuning = {**info, "split": split, "base_method": base}
        log.info("temperature scaling of %s on %s (N=%d): T=%.4f, NLL %.4f -> %.4f (%d L-BFGS iterations)",
                 base, split, info["n_fit"], T, info["nll_before"], info["nll_after"], info["iterations"])

    # --- persistence ----------------------------------------------------------------------------------------
    def fitted_state(self) -> dict:
        return {"temperature": torch.tensor([self.temperature], dtype=torch.float64),
                "tuning": {k: v for k, v in self.tuning.items() if isinstance(v, (int, float, str))}}

    def load_fitted_state(self, state: dict) -> None:
        if "temperature" not in state:
            raise UqloraError("this run directory has no fitted temperature (checkpoints/method_state.pt)")
        T = float(torch.as_tensor(state["temperature"]).reshape(-1)[0])
        if not T > 0 or T == float("inf"):
            raise UqloraError(f"the saved temperature must be a finite value > 0, got {T}")
        self.temperature = T
        self.tuning = dict(state.get("tuning", {}))
