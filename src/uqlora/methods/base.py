"""The LightningModule every method derives from: training with the (label-smoothed)
cross-entropy, AdamW with linear warm-up/decay, validation metrics, and the predictive interface

* ``prepare_fit(datamodule, runs)`` -- before training (``runs``: access to other finished runs' predictions);
* ``posthoc_fit(datamodule)``  -- the stage after training (post-hoc methods: :mod:`uqlora.methods.posthoc`);
* ``predictive(batch) -> probs [B, C]``;
* ``predictive_samples(batch) -> [S, B, C] | None`` for methods that sample;
* ``method_state_dict()`` / ``load_method_state_dict()`` -- the fitted state (tensors and plain values only).

A method predicts only once it is fitted (``posthoc_fit`` ran, or a saved state was loaded); before that,
prediction raises a one-line error.

On generation data (token-level SFT, head ``lm_sft``) a batch's rows are its target tokens (``row_sample``
names each row's example): the loss averages the rows as ``loss.token_reduction`` says, with the UAL authors'
smoothing target, and ``predict_step`` returns per-token scores of :meth:`token_predictive` (the mean over the
method's weight draws of the token probabilities) instead of ``[N, V]`` probabilities
(:func:`uqlora.core.sft.token_scores`).
"""
from __future__ import annotations

import contextlib
import logging
import math

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from uqlora.core.scores import entropy_of_logits
from uqlora.core.sft import row_weights, token_scores
from uqlora.errors import UqloraError
from uqlora.models.base import param_groups
from uqlora.models.precision import effective_precision


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float | torch.Tensor = 0.0,
                           choice_mask: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                           others_only: bool = False) -> torch.Tensor:
    """Mean over rows (or the ``weight``-weighted sum) of (1 - eps) * NLL + eps * (mean over the valid classes
    of -log p_c). A row is an example (classification) or a target token (token-level SFT, C = the vocabulary).

    ``eps`` may be a scalar or a per-row tensor [R]; masked (padded) choices get no smoothing mass, unlike
    ``F.cross_entropy(label_smoothing=...)`` which would spread it over them too. ``others_only``: the mean
    runs over the C - 1 classes other than the label (the UAL authors' target: 1 - eps on the label, eps / (V - 1)
    on every other token) instead of all C.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # float32 at least (bf16/fp16 logits upcast)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    reduce = (lambda x: x.mean()) if weight is None else (lambda x: (x * weight.to(x.dtype)).sum())  # noqa: E731
    if not torch.is_tensor(eps) and eps == 0.0:
        return reduce(nll)
    if choice_mask is None:  # sum_c log p_c from the logits, without a second [R, C] tensor
        sum_logp, n = z.sum(1) - z.shape[1] * lse, float(z.shape[1])
    else:
        mask = choice_mask.to(z.dtype)
        sum_logp, n = ((z - lse.unsqueeze(1)) * mask).sum(1), mask.sum(1)
    eps = torch.as_tensor(eps, dtype=z.dtype, device=z.device)
    if others_only:  # a row with one valid class has no other class to smooth towards: plain NLL
        n_others = torch.as_tensor(n, dtype=z.dtype, device=z.device) - 1
        smooth, eps = -(sum_logp + nll) / n_others.clamp(min=1.0), eps * (n_others > 0)
    else:
        smooth = -sum_logp / n
    return reduce((1 - eps) * nll + eps * smooth)


predictive_entropy = entropy_of_logits  # the entropy term of the loss (kept under its old name)


ENTROPY_SUBSETS = ("all", "labels:<k>[,<k>...]", "ids:<file with one example id per line>")


def entropy_subset_flags(spec: str, records: list[dict]) -> list[float] | None:
    """1.0 for the training records in the entropy subset, 0.0 for the others; None for ``all``."""
    spec = str(spec or "all")
    if spec == "all":
        return None
    kind, _, value = spec.partition(":")
    if kind == "labels" and value:
        try:
            labels = {int(v) for v in value.split(",")}
        except ValueError:
            labels = None
        if labels is not None:
            return [float(int(r["label"]) in labels) for r in records]
    elif kind == "ids" and value:
        from pathlib import Path

        path = Path(value)
        if not path.is_file():
            raise UqloraError(f"loss.entropy_subset: id file '{value}' does not exist")
        ids = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        flags = [float(str(r["id"]) in ids) for r in records]
        if records and not any(flags):
            raise UqloraError(f"loss.entropy_subset: none of the {len(ids)} ids in '{value}' is a training example")
        return flags
    raise UqloraError(f"unknown loss.entropy_subset '{spec}'; valid choices: {', '.join(ENTROPY_SUBSETS)}")


class UQMethod(pl.LightningModule):
    name = "base"
    trains = True  # False for purely post-hoc methods on a frozen model
    restore_best_after_fit = True  # evaluate the adapter of the best validation loss
    strict_loading = False  # Lightning checkpoints hold only the trainable tensors (see on_save_checkpoint)
    probability_scores: tuple[str, ...] = ()  # per-example u_* outputs meant as P(error) (their ECE is reported)
    extra_state_prefixes: tuple[str, ...] = ()  # trained state outside the backbone kept in last.ckpt (e.g. "var.")
    supports_generation = False  # trains / predicts token-level SFT (generation data, head lm_sft)

    def __init__(self, backbone, cfg):
        super().__init__()
        self.backbone = backbone
        self.mcfg, self.optim_cfg = cfg.method, cfg.optim
        self.label_smoothing = float(cfg.loss.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UqloraError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        # entropy optimisation (Scholten et al., 2025): + lambda_f * H(subset) + lambda_r * H(rest)
        self.entropy_weight = float(cfg.loss.get("entropy_weight", 0.0))
        self.entropy_weight_rest = float(cfg.loss.get("entropy_weight_rest", 0.0))
        self.entropy_subset = str(cfg.loss.get("entropy_subset", "all") or "all")
        entropy_subset_flags(self.entropy_subset, [])  # validate the spelling before any training
        self.token_reduction = str(cfg.loss.get("token_reduction", "sample"))  # token-level SFT: see row_loss_args
        row_weights(torch.zeros(1, dtype=torch.long), 1, self.token_reduction)  # validate the spelling
        self.fitted = False  # post-hoc state ready; set by posthoc_fit / load_method_state_dict
        self.accelerator = str(cfg.trainer.get("accelerator", "cpu"))
        self.precision = effective_precision(cfg.model.get("precision", "32-true"), self.accelerator)
        self.progress_mode = str(cfg.get("progress_bar", "auto"))  # uqlora.progress.track: auto/rich/text/none
        # validation accuracy and ECE as torchmetrics: accumulated over the epoch and summed across DDP processes
        from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

        C = max(2, int(getattr(backbone, "num_classes", 2)))
        self.val_acc = MulticlassAccuracy(num_classes=C, average="micro")
        self.val_ece = MulticlassCalibrationError(num_classes=C, n_bins=int((cfg.get("eval") or {}).get("n_bins", 15)), norm="l1")

    # --- post-hoc stages run outside the Trainer: their device and autocast ------------------------------
    def fit_device(self) -> torch.device:
        if self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    def autocast(self, device):
        if self.precision.startswith("bf16"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if self.precision.startswith("16"):
            return torch.autocast(device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def forward(self, batch):
        return self.backbone.logits(batch)

    def loss(self, logits, batch):
        ce = smoothed_cross_entropy(logits, batch["labels"], self.label_smoothing, batch.get("choice_mask"),
                                    **self.row_loss_args(batch))
        return ce + self.entropy_term(logits, batch)

    def row_loss_args(self, batch) -> dict:
        """Token-level SFT batches (rows = target tokens, ``row_sample``): the rows' weights
        (``loss.token_reduction``, :func:`uqlora.core.sft.row_weights`) and the authors' smoothing target
        (``others_only``); classification batches: none (mean over examples, smoothing over all classes)."""
        if "row_sample" not in batch:
            return {}
        n = batch["input_ids"].shape[0]
        return {"weight": row_weights(batch["row_sample"], n, self.token_reduction), "others_only": True}

    def entropy_term(self, logits, batch) -> torch.Tensor | float:
        r"""The entropy-optimisation term of Scholten et al. (ICLR 2025, their ``unlearning_trainer.py``):

        .. math:: \lambda_f \, \overline{H}(\text{subset}) + \lambda_r \, \overline{H}(\text{rest}),

        where :math:`\overline{H}` is the mean predictive entropy (nats, over the valid answers) of the batch's
        examples in the subset / outside it (``loss.entropy_subset``; 0 when the batch has none), with
        :math:`\lambda_f` = ``loss.entropy_weight`` and :math:`\lambda_r` = ``loss.entropy_weight_rest``.
        A positive weight minimises the entropy (concentrates the answer distribution: what the paper does on
        the forget set, :math:`\lambda_f = 1`), a negative one maximises it (the paper's retain set,
        :math:`\lambda_r = -0.25`). The paper averages the per-token vocabulary entropy over all positions of
        the forget/retain sequences; here the predictive is the distribution over the C answers, so its
        entropy is the entropy of that distribution."""
        if not self.entropy_weight and not self.entropy_weight_rest:
            return 0.0
        h = predictive_entropy(logits)
        flag = batch.get("entropy_subset")
        inside = torch.ones_like(h) if flag is None else flag.to(h.device, h.dtype)
        out = 0.0
        for weight, w in ((self.entropy_weight, inside), (self.entropy_weight_rest, 1.0 - inside)):
            if weight and w.sum() > 0:
                out = out + weight * (h * w).sum() / w.sum()
        return out

    def training_step(self, batch, batch_idx):
        loss = self.loss(self(batch), batch)
        if not torch.isfinite(loss):
            raise UqloraError(f"training loss is {loss.item()} at step {self.global_step} (method '{self.name}'); "
                              f"lower optim.lr (now {self.optim_cfg.lr}) or check the data")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        labels = batch["labels"]
        n = labels.shape[0]
        # sync_dist: under DDP every process sees the validation loss of the whole split (mean of the per-process
        # means), so best-adapter selection and early stopping decide the same on every rank (no-op otherwise)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        probs = logits.float().softmax(-1).detach()
        self.val_acc.update(probs, labels)
        self.val_ece.update(probs, labels)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True, batch_size=n)
        self.log("val/ece", self.val_ece, prog_bar=True, on_epoch=True, batch_size=n)
        if "row_sample" in batch:  # token rows: [R, V] probabilities are too large to keep for the epoch
            conf, pred = probs.max(-1)
            return {"confidence": conf, "correct": pred == labels}
        return {"probs": probs, "labels": labels}

    def predictive(self, batch) -> torch.Tensor:
        return self(batch).softmax(-1)

    def predictive_samples(self, batch) -> torch.Tensor | None:
        return None

    def require_fitted(self) -> None:
        if not self.fitted:
            raise UqloraError(f"method '{self.name}' predicts before it was fitted: run its fit (train.py) or load "
                              "a saved state (eval.py run_dir=...) first")

    def on_predict_start(self):
        self.require_fitted()
        self.start_predict()

    def on_predict_end(self):
        self.end_predict()

    def start_predict(self) -> None:
        """Before a prediction pass (e.g. draw the S weight samples shared by every batch)."""

    def end_predict(self) -> None:
        """After a prediction pass (e.g. put the point estimate back)."""

    def token_predictive(self, batch) -> torch.Tensor:
        """Token-level SFT: the predictive next-token distribution ``[R, V]`` at the batch's target rows -- the
        point estimate's, or for a method with S > 1 weight draws the mean over S of the token probabilities,
        accumulated one draw at a time (S x [R, V] is never held)."""
        S = int(self.num_weight_samples())
        if S <= 1:
            return self.predictive(batch).float()
        p = None
        for s in range(S):
            with self.weight_sample(s):
                q = self(batch).float().softmax(-1)
            p = q if p is None else p.add_(q)
        return p / S

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if "row_sample" in batch:  # token-level SFT: per-token scores of the reference answers
            return token_scores(self.token_predictive(batch), batch["labels"], batch["row_sample"],
                                batch["input_ids"].shape[0])
        samples = self.predictive_samples(batch)
        if samples is not None:  # the predictive of a sampling method is the mean of its sampled probabilities
            samples = samples.float()
            return {"probs": samples.mean(0), "labels": batch["labels"], "samples": samples}
        return {"probs": self.predictive(batch).float(), "labels": batch["labels"]}

    # --- weight draws for free-text generation (eval.prob.generate): one context per posterior sample ---------
    def num_weight_samples(self) -> int:
        """How many distinct weight draws :meth:`weight_sample` offers (1: the point estimate)."""
        return 1

    @contextlib.contextmanager
    def weight_sample(self, s: int):
        """Within the context the backbone holds weight draw ``s`` (sampling methods override this)."""
        yield

    def setup(self, stage: str) -> None:
        # sharded strategies (FSDP, FSDP2 / ModelParallel, DeepSpeed ZeRO-3) replace every parameter by a shard
        # of a flat buffer during fit (and rename the wrapped modules): the best-adapter checkpoints, SWAG
        # snapshots and the post-hoc stages read the LoRA (+ head) tensors directly and would save or fit shards
        strategy = self.trainer.strategy
        name = type(strategy).__name__
        zero3 = name.startswith("DeepSpeed") and (getattr(strategy, "config", None) or {}).get(
            "zero_optimization", {}).get("stage") == 3
        if stage == "fit" and (name.startswith(("FSDP", "ModelParallel")) or zero3):
            raise UqloraError(f"trainer strategy {name} shards the LoRA tensors during fit, which the adapter "
                              "checkpoints, SWAG and the post-hoc stages read whole; use trainer=ddp (replicated "
                              "weights; for memory: model.gradient_checkpointing=true, model.dtype=bf16, "
                              "model.load_in_4bit=true)")

    def on_fit_end(self):
        # multi-process runs: rank 0 alone writes the adapters of the fit (best_adapter.pt, ...); the others read
        # them right after fit (restore_best), so they wait here until rank 0 is done (no-op in one process)
        self.trainer.strategy.barrier("uqlora_fit_end")

    def extra_callbacks(self, member_dir) -> list:
        """Callbacks the method needs during fit (e.g. SWAG moment collection)."""
        return []

    def _checkpoint_shapes(self) -> dict[str, tuple]:
        """The tensors a Lightning checkpoint of this method holds: the trainable backbone tensors and the state
        under :attr:`extra_state_prefixes`."""
        own = {f"backbone.{n}": tuple(p.shape) for n, p in self.backbone.named_parameters() if p.requires_grad}
        if self.extra_state_prefixes:
            own.update({k: tuple(v.shape) for k, v in self.state_dict().items() if k.startswith(self.extra_state_prefixes)})
        return own

    def on_save_checkpoint(self, checkpoint):
        keep = self._checkpoint_shapes()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint):
        """Loading is non-strict (the frozen backbone is not in the checkpoint), so check here that the
        checkpoint holds exactly this model's trainable tensors: another model's fails in one line."""
        own = self._checkpoint_shapes()
        got = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        missing, unexpected = sorted(set(own) - set(got)), sorted(set(got) - set(own))
        wrong = sorted(k for k in own if k in got and own[k] != got[k])
        if missing or unexpected or wrong:
            first = (wrong or missing or unexpected)[0]
            raise UqloraError(f"checkpoint does not match this model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(wrong)} wrong-shape tensors, e.g. '{first}'): it was saved from a "
                              "different model/head/LoRA config")

    def prepare_fit(self, datamodule, runs=None) -> None:
        """Called before training (e.g. UAL attaches per-example label smoothing to the train records, from the
        predictions of a teacher run that ``runs`` -- a :class:`uqlora.sources.RunAccess` -- evaluates); here:
        the entropy-subset flag of every training record, when ``loss.entropy_subset`` is not ``all``."""
        if not self.entropy_weight and not self.entropy_weight_rest:
            return
        datamodule.setup()
        flags = entropy_subset_flags(self.entropy_subset, datamodule.records["train"])
        if flags is not None:
            datamodule.records["train"] = [dict(r, entropy_subset=f) for r, f in zip(datamodule.records["train"], flags)]
            logging.getLogger(__name__).info("entropy subset '%s': %d of %d training examples", self.entropy_subset,
                                             int(sum(flags)), len(flags))

    def posthoc_fit(self, datamodule) -> None:
        self.fitted = True

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_method_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fitted = True

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the backbone that AdamW steps too (without weight decay, on the same
        schedule), e.g. variational standard deviations."""
        return []

    def after_optimizer_step(self, optimizer) -> None:
        """Called after every optimiser step (e.g. a separate SGD step on a KL term)."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(optimizer)

    def configure_optimizers(self):
        groups = param_groups(self.backbone)
        extra = self.extra_parameters()
        if extra:
            groups.append({"params": list(extra), "weight_decay": 0.0})
        o = self.optim_cfg
        opt = torch.optim.AdamW(groups, lr=float(o.lr), weight_decay=float(o.weight_decay),
                                betas=tuple(o.get("betas", (0.9, 0.999))), eps=float(o.get("eps", 1e-8)))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(math.ceil(float(o.get("warmup_ratio", 0.0)) * total))

        def lr_lambda(step):
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm)) if o.get("schedule", "linear") == "linear" else 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
