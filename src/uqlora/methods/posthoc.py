"""Post-hoc methods: fitted on a named split of a finished model, never on the test split.

A post-hoc method (Laplace-LoRA, temperature scaling, AdUE, TFB) starts from a trained adapter -- the MAP
training of its own run, a finished run (``method.map_run=<run dir>``) or a PEFT-format adapter trained
elsewhere (``method.adapter=<folder or hub id>``), which the orchestrator loads into the backbone -- and fits its own state in :meth:`PostHocMethod.fit` over one split. Everything
that loops over a split goes through :meth:`PostHocMethod.batches` (device, eval mode, autocast, progress
bar and, optionally, a DDP shard per process: written once here). Methods that calibrate another method's
predictive (``wraps_any = True``: temperature scaling) get that method, built by the orchestrator from the
source run's config and state, through :meth:`attach_base`; its state is saved inside theirs (``base``), so
the run directory is self-contained.

Predicting before the state was fitted or loaded raises a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from uqlora.errors import UqloraError
from uqlora.methods.base import UQMethod
from uqlora.schema import MethodConfig

NEVER = ("test", "ood")


@dataclass
class PostHocConfig(MethodConfig):
    """Options every post-hoc method has."""

    map_run: Optional[str] = None  # a finished run directory whose adapter is used instead of training
    adapter: Optional[str] = None  # a PEFT adapter (folder or hub id) used instead of training (models/peft_io.py)


class PostHocMethod(UQMethod):
    wraps_any = False        # True: the source run's own method is rebuilt and its predictive wrapped
    fit_split_key = "fit_split"  # the config key naming the split the state is fitted on

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.base: UQMethod | None = None

    # --- the source ------------------------------------------------------------------------------------------
    def attach_base(self, base: UQMethod | None) -> None:
        """The source run's method (with its fitted state), when it is not MAP-like (see :attr:`wraps_any`)."""
        if base is not None and not self.wraps_any:
            raise UqloraError(f"method '{self.name}' works on a trained adapter, not on another method's predictive")
        self.base = base

    @property
    def fit_split(self) -> str:
        split = str(self.mcfg.get(self.fit_split_key))
        if split in NEVER:
            raise UqloraError(f"method.{self.fit_split_key}={split} would fit on held-out evaluation data; "
                              "valid choices: train, val, calib")
        return split

    # --- fitting ---------------------------------------------------------------------------------------------
    def prepare_fit(self, datamodule, runs=None) -> None:
        self._require_split(datamodule, self.fit_split)  # fail before training, not after
        super().prepare_fit(datamodule, runs)

    def posthoc_fit(self, datamodule) -> None:
        self._require_split(datamodule, self.fit_split)
        self.fit(datamodule)
        self.fitted = True

    def fit(self, datamodule) -> None:
        """Fit the method's state on ``datamodule``'s :attr:`fit_split` (and any other non-test split)."""
        raise NotImplementedError

    @staticmethod
    def _require_split(datamodule, split: str) -> None:
        if not datamodule.has(split):
            if hasattr(datamodule, "missing"):  # the Python API's DataLoader splits say how to pass one
                raise UqloraError(datamodule.missing(split))
            raise UqloraError(f"split '{split}' has no examples (data.{split}_size / data.max_{split}_samples); "
                              "valid choices: train, val, calib")

    def batches(self, loader, desc: str, shard: bool = False) -> Iterator[dict]:
        """The batches of ``loader`` on the fit device, the model in eval mode, under the run's autocast, with a
        progress bar (log lines without a terminal); ``shard``: only this process's contiguous shard (DDP; the caller
        sums across processes)."""
        from uqlora import distributed as dist
        from uqlora.progress import track

        if shard and dist.world_size() > 1:
            loader = dist.shard_loader(loader, dist.world_size(), dist.global_rank())
        device = self.fit_device()
        self.to(device).eval()
        for batch in track(loader, desc, self.progress_mode):
            with self.autocast(device):
                yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- the wrapped predictive ------------------------------------------------------------------------------
    def base_outputs(self, batch, batch_idx: int = 0, dataloader_idx: int = 0):
        """``(outputs without probs/samples, log p [B, C])`` of the underlying predictive of one batch: the base
        method's when one is attached, else the adapter's softmax."""
        from torch.nn import functional as F

        if self.base is None:
            return {"labels": batch["labels"]}, F.log_softmax(self(batch).float(), -1)
        out = dict(self.base.predict_step(batch, batch_idx, dataloader_idx))
        probs = out.pop("probs").float()
        out.pop("samples", None)
        # a real choice whose probability underflowed to 0 gets log(1e-45), not -inf: its label would otherwise
        # make an NLL unbounded
        log_p = probs.clamp_min(1e-45).log()
        mask = batch.get("choice_mask")
        if mask is not None:  # padded choices stay at probability 0 whatever the base method gave them
            log_p = log_p.masked_fill(~mask.bool().to(log_p.device), -torch.inf)
        return out, log_p

    def start_predict(self):
        if self.base is not None:
            self.base.start_predict()

    def end_predict(self):
        if self.base is not None:
            self.base.end_predict()

    # --- persistence -----------------------------------------------------------------------------------------
    def method_state_dict(self) -> dict:
        if not self.fitted:
            return {}
        state = self.fitted_state()
        if self.base is not None:
            from omegaconf import OmegaConf

            state["base"] = self.base.method_state_dict()
            state["base_method_config"] = OmegaConf.to_container(self.base.mcfg, resolve=True, enum_to_str=True)
        return state

    def load_method_state_dict(self, state: dict) -> None:
        if not state:
            raise UqloraError(f"this run directory has no fitted {self.name} state (checkpoints/method_state.pt)")
        if self.base is not None:
            self.base.load_method_state_dict(state.get("base") or {})
        self.load_fitted_state(state)
        self.fitted = True

    def fitted_state(self) -> dict:
        """The fitted state, tensors / plain Python values only (loaded with ``weights_only=True``)."""
        raise NotImplementedError

    def load_fitted_state(self, state: dict) -> None:
        raise NotImplementedError
