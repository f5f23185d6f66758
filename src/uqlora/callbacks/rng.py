"""Random-number state in Lightning's ``last.ckpt``, so a resumed run draws the same dropout masks (and
any other global random numbers) as the uninterrupted run would have, making resume bit-exact on CPU.

Lightning checkpoints restore weights, optimiser, schedulers, loops and callback states, but not the
global generators. This callback stores Python's, NumPy's and torch's (CPU, and CUDA when present) at
the moment the checkpoint is written and puts them back when the checkpoint is loaded. The data order
does not need it: :class:`~uqlora.data.datamodule.EpochShuffleSampler` reseeds from (seed, epoch).
"""
from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch


class RNGStateCheckpoint(pl.Callback):
    @property
    def state_key(self) -> str:
        return "RNGStateCheckpoint"

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                 "python_version": int(random.getstate()[0]), "python_gauss": random.getstate()[2],
                 "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                           "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"]), state["python_gauss"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        if "cuda" in state and torch.cuda.is_available():  # as many devices as both runs see
            for i, st in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(st, i)
