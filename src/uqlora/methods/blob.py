"""BLoB (Wang et al., NeurIPS 2024): Bayesian LoRA by backpropagation -- a Gaussian over every LoRA A
(:class:`uqlora.core.blob.BLoB`), trained with the NLL and a cyclically weighted KL.

Optimisation as the official code (Wang-ML-Lab/bayesian-peft, ``modelwrappers/blob.py``), which produced the
published numbers (``method.rho_update=sgd``): AdamW (``optim.*``) steps the LoRA A/B (+ head) on the NLL; after
each AdamW step one SGD step with learning rate ``kllr`` (times the same warm-up/decay factor) moves A by
``pi_t dKL/dA`` and rho by ``dNLL/drho + pi_t dKL/drho`` -- rho is not in AdamW. ``rho_update=adamw``: rho in
AdamW (no decay) with the NLL and the SGD step on the KL only (SRI-CSL/BayesAdapt's arrangement).
pi_t = 2^i / (2^(M+1) - 1), i = t mod M + 1, M = ``kl_cycle`` or int(100 N^(pi/gamma) / global batch).

Prediction: ``num_samples`` weight draws made once per evaluation from ``eval_seed`` and shared by every batch
(each sample is one function over the whole split), probabilities averaged, samples saved like SWAG's;
``num_samples=0``: the mean weights. Validation during training uses the mean weights, and the adapter after
the last step is evaluated (as the official code). The adapter file holds the mean (LoRA A, B, head), the
method state the variational parameters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from uqlora.core.blob import BLoB, LoRANoise, kl_cycle_length, kl_weight, lora_layers
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.base import UQMethod
from uqlora.schema import Choice, MethodConfig, at_least, int_at_least, non_negative, optional, positive, rule


class RhoUpdate(Choice):
    sgd = "sgd"        # rho moves only in the SGD step with the KL (the official code)
    adamw = "adamw"    # rho in AdamW with the NLL (SRI-CSL/BayesAdapt)


@dataclass
class VariationalConfig(MethodConfig):
    """Options every Gaussian-LoRA method trained with a cyclically weighted KL has (BLoB, ScalaBL)."""

    eps: float = positive(0.05)    # std parameter ~ U[eps / sqrt 2, eps] at init
    kllr: float = non_negative(0.01)  # learning rate of the SGD step on the KL (and on rho's NLL gradient)
    gamma: float = positive(8.0)   # M = int(100 N^(pi / gamma) / global batch)
    kl_cycle: Optional[int] = rule(None, optional(int_at_least(1)))  # M itself (null: from gamma)
    kl_reweighting: bool = True    # pi_i = 2^i / (2^(M+1) - 1); false: 1 / M
    train_samples: int = at_least(1, 1)  # weight samples per training step (mean of their NLLs)
    num_samples: int = at_least(0, 10)   # weight draws at test time; 0: the mean weights
    eval_seed: int = 0


@dataclass
class BlobConfig(VariationalConfig):
    name: str = "blob"
    display_name: str = "BLoB"
    beta: float = positive(0.2)    # prior N(0, beta^2) on every element of A
    rho_update: RhoUpdate = RhoUpdate.sgd


class SampledLoRA:
    """The predictive of a Gaussian-LoRA method (``self.var``: a :class:`LoRANoise`): weight draws made once per
    evaluation from ``method.eval_seed``, shared by every batch; ``method.num_samples=0``: the mean weights."""

    var: LoRANoise | None
    _draws: list | None = None

    def _noise(self) -> LoRANoise:
        if self.var is None:
            raise UqloraError(f"method '{self.name}' predicts before its variational state was fitted or loaded")
        return self.var

    def _weight_draws(self) -> list:
        if self._draws is None:
            self._draws = self._noise().draws(int(self.mcfg.num_samples), int(self.mcfg.eval_seed))
        return self._draws

    def start_predict(self):
        self._draws = None

    def end_predict(self):
        self._draws = None

    def predictive(self, batch) -> torch.Tensor:
        with self._noise().use_draw(None):
            return self(batch).softmax(-1)

    def predictive_samples(self, batch) -> torch.Tensor | None:
        if int(self.mcfg.num_samples) == 0:
            return None
        noise, out = self._noise(), []
        for draw in self._weight_draws():
            with noise.use_draw(draw):
                out.append(self(batch).softmax(-1))
        return torch.stack(out)

    def num_weight_samples(self) -> int:
        return max(1, int(self.mcfg.num_samples))

    @contextlib.contextmanager
    def weight_sample(self, s: int):
        draw = self._weight_draws()[int(s)] if int(self.mcfg.num_samples) else None
        with self._noise().use_draw(draw):
            yield


@register("blob", BlobConfig)
class BLoBMethod(SampledLoRA, UQMethod):
    restore_best_after_fit = False  # the variational state after the last step (rho is not in the best adapter)
    extra_state_prefixes = ("var.",)  # the variational parameters live outside the backbone (in last.ckpt too)

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.batch_size = int(cfg.data.batch_size)
        self.n_train: int | None = None
        self.cycle: int | None = None
        self.var = self.build_noise(lora_layers(backbone))

    def build_noise(self, layers) -> LoRANoise:
        return BLoB(layers, eps=float(self.mcfg.eps), beta=float(self.mcfg.beta))

    def extra_parameters(self) -> list:
        """Variational parameters AdamW steps (without weight decay) besides the backbone's."""
        return self.var.variational_parameters() if self.mcfg.rho_update == "adamw" else []

    def sgd_nll_parameters(self) -> list:
        """Parameters whose NLL gradient the KL's SGD step applies (rho, official arrangement)."""
        return self.var.variational_parameters() if self.mcfg.rho_update == "sgd" else []

    # --- training -------------------------------------------------------------------------------------------
    def prepare_fit(self, datamodule, runs=None) -> None:
        super().prepare_fit(datamodule, runs)
        datamodule.setup()
        self.n_train = len(datamodule.records["train"])

    def on_fit_start(self):
        t = self.trainer
        if str(t.precision).startswith("16") and self.sgd_nll_parameters():
            raise UqloraError(f"method={self.name} with method.rho_update=sgd steps rho outside the optimizer, which "
                              f"fp16 loss scaling (trainer.precision={t.precision}) does not unscale; use bf16-mixed, "
                              "32-true or method.rho_update=adamw")
        if self.mcfg.kl_cycle is not None:
            self.cycle = int(self.mcfg.kl_cycle)
        else:
            n = self.n_train if self.n_train is not None else len(t.datamodule.records["train"])
            world = max(1, int(t.world_size))
            self.cycle = kl_cycle_length(n, self.batch_size * world * int(t.accumulate_grad_batches), self.mcfg.gamma)

    def kl_weight(self) -> float:
        return kl_weight(self.global_step, self.cycle or 1, bool(self.mcfg.kl_reweighting))

    def training_step(self, batch, batch_idx):
        n = int(self.mcfg.train_samples)
        if n == 1:
            loss = super().training_step(batch, batch_idx)
        else:
            loss = sum(self.loss(self(batch), batch) for _ in range(n)) / n
            if not torch.isfinite(loss):
                raise UqloraError(f"training loss is {loss.item()} at step {self.global_step} (method '{self.name}'); "
                                  f"lower optim.lr (now {self.optim_cfg.lr}) or check the data")
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                     batch_size=batch["labels"].shape[0])
        with torch.no_grad():
            self.log("train/kl", self.var.kl().float(), on_step=True, on_epoch=False)
        self.log("train/kl_weight", self.kl_weight(), on_step=True, on_epoch=False)
        return loss

    def after_optimizer_step(self, optimizer) -> None:
        self.kl_step(optimizer)

    def kl_step(self, optimizer) -> None:
        """The SGD step on pi_t KL (every replica identically under DDP: the KL counts once), plus the NLL
        gradient of the parameters outside AdamW."""
        lr = float(self.mcfg.kllr) * float(optimizer.param_groups[0]["lr"]) / float(self.optim_cfg.lr)
        params, nll_too = self.var.kl_parameters(), {id(p) for p in self.sgd_nll_parameters()}
        with torch.enable_grad():
            grads = torch.autograd.grad(self.var.kl() * self.kl_weight(), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                step = torch.zeros_like(p) if g is None else g.to(p.dtype)
                if id(p) in nll_too and p.grad is not None:
                    step = step + p.grad
                if lr:
                    p.add_(step, alpha=-lr)
        for p in self.sgd_nll_parameters():
            p.grad = None

    # --- the fitted state: the variational parameters -------------------------------------------------------
    def method_state_dict(self):
        return {"method": self.name, "names": list(self.var.names), **self.var.state()}

    def load_method_state_dict(self, state):
        if not state or state.get("method") != self.name:
            raise UqloraError(f"this run directory has no {self.name} state (checkpoints/method_state.pt holds "
                              f"{state.get('method') if state else 'nothing'})")
        if list(state["names"]) != list(self.var.names):
            raise UqloraError(f"the saved {self.name} state covers other LoRA layers ({len(state['names'])}) than "
                              f"this model ({len(self.var.names)})")
        self.var.load_state(state)
        self._draws = None
        self.fitted = True
