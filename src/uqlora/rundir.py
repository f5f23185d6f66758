"""A run directory, the unit of record: one object that knows its files.

    .hydra/config.yaml        the composed config (written by Hydra)
    run_config.json           the resolved config the run started with (resume and skip compare against it)
    results.json              status (complete | failed + error), metrics per split, timings, versions,
                              git commit + dirty flag, data file hashes, seed, method label, the resolved config
    error.log                 the traceback of a failed run
    predictions/<split>.npz   probs, labels, ids (and samples for sampling methods)
    plots/                    reliability diagrams, risk-coverage curves, ...
    checkpoints/adapter.pt    LoRA + head tensors used for the reported numbers
    checkpoints/method_state.pt   the method's fitted state (may be empty)
    checkpoints/last.ckpt     adapter + optimiser + loop/callback/RNG state, for resume=true
    adapter/                  the adapter in PEFT format: adapter_config.json, adapter_model.safetensors
                              (+ uqlora_head.safetensors, uqlora_adapter.json; see uqlora.models.peft_io)
    members/<m>/checkpoints/  the same per member of a multi-member run (ensembles, MultiSWAG)

The training pipeline, ``eval.py``, the table maker and the notebooks all read run directories through
:class:`RunDir`. Every write is atomic (:mod:`uqlora.io`).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from uqlora.errors import UqloraError

COMPLETE, FAILED, REFUSED, UNFINISHED = "complete", "failed", "refused", "unfinished"
MISSING, UNREADABLE = "missing", "unreadable"
REFUSED_MARKER = ".refused"
CONFIG_SNAPSHOT = "run_config.json"


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def label_of(name: str | None, method_cfg: dict | None = None, choice: str | None = None,
             explicit: str | None = None) -> str:
    """The name a run's method gets in tables: an explicit label (results.json ``method_label``), else the
    Hydra option that selected it (``laplace_ll``, ``swag_lora``), else ``laplace_ll`` for a Laplace run with
    ``method.subset=last_layer`` (runs made before labels were recorded), else ``method.name``."""
    if explicit:
        return str(explicit)
    if choice and "/" not in str(choice):
        return str(choice)
    method_cfg = method_cfg or {}
    name = str(name or method_cfg.get("name") or "?")
    if name == "laplace" and method_cfg.get("subset") == "last_layer":
        return "laplace_ll"
    return name


class RunDir:
    """A run directory (existing or to be written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- layout ---------------------------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        """The adapter in PEFT format (``PeftModel.from_pretrained(base, run.adapter_dir)``)."""
        return self.path / "adapter"

    def predictions_path(self, split: str) -> Path:
        return self.path / "predictions" / f"{split}.npz"

    def plot_path(self, name: str) -> Path:
        return self.path / "plots" / f"{name}.png"

    def member(self, m: int, num_models: int) -> "RunDir":
        """Member ``m``'s directory: the run itself for a single model, else ``members/<m>``."""
        return self if num_models == 1 else RunDir(self.path / "members" / str(m))

    def members(self) -> list["RunDir"]:
        """The directories holding a saved adapter: ``members/<m>`` in order, or the run itself."""
        found = sorted((self.path / "members").glob("*/checkpoints/adapter.pt"), key=lambda p: int(p.parents[1].name))
        dirs = [RunDir(p.parents[1]) for p in found] or [self]
        if not (dirs[0].checkpoints / "adapter.pt").is_file():
            raise UqloraError(f"run directory '{self.path}' has no checkpoints/adapter.pt")
        return dirs

    # --- reading --------------------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return (self.path / ".hydra").is_dir() or self.results_path.is_file()

    def config(self):
        """The composed config (``.hydra/config.yaml``) as a DictConfig."""
        from omegaconf import OmegaConf

        path = self.path / ".hydra" / "config.yaml"
        if not path.is_file():
            raise UqloraError(f"'{self.path}' is not a run directory (no .hydra/config.yaml)")
        return OmegaConf.load(path)

    def config_dict(self) -> dict:
        """The composed config as a plain dict (``{}`` when absent or unreadable)."""
        return _load_yaml(self.path / ".hydra" / "config.yaml")

    def hydra_choice(self, group: str) -> str | None:
        hydra = _load_yaml(self.path / ".hydra" / "hydra.yaml").get("hydra") or {}
        return ((hydra.get("runtime") or {}).get("choices") or {}).get(group)

    def job_num(self) -> int | None:
        """The job's number in its sweep (``hydra.job.num``), None outside a sweep or when unrecorded."""
        num = ((_load_yaml(self.path / ".hydra" / "hydra.yaml").get("hydra") or {}).get("job") or {}).get("num")
        return num if isinstance(num, int) and not isinstance(num, bool) else None

    def overrides(self) -> list[str]:
        """The command-line overrides the run was launched with (``.hydra/overrides.yaml``; ``[]`` when absent)."""
        try:
            data = yaml.safe_load((self.path / ".hydra" / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return []
        return [str(x) for x in data] if isinstance(data, list) else []

    def results(self) -> dict | None:
        """``results.json``, or None when absent, truncated or not a results file."""
        try:
            res = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(res, dict) or ("metrics" not in res and res.get("status") != FAILED):
            return None
        return res

    def status(self) -> str:
        """``complete``, ``failed``, ``refused`` (a sweep refused to run it) or ``unfinished`` (no result yet:
        running, killed, or never started)."""
        if (self.path / REFUSED_MARKER).is_file():
            return REFUSED
        res = self.results()
        if is_complete(res):
            return COMPLETE
        if res is not None and res.get("status") == FAILED:
            return FAILED
        return UNFINISHED

    def status_detail(self) -> tuple[str, str]:
        """``(status, why)`` for reports: ``complete`` / ``failed`` / ``refused`` / ``missing`` (no results.json:
        still running, or stopped before writing it) / ``unreadable`` (truncated, not JSON, no metrics)."""
        if (self.path / REFUSED_MARKER).is_file():
            return REFUSED, (self.path / REFUSED_MARKER).read_text().strip()
        if not self.results_path.is_file():
            return MISSING, "no results.json (still running, or stopped before writing it)"
        try:
            res = json.loads(self.results_path.read_text())
            if not isinstance(res, dict):
                raise ValueError(f"top level is a {type(res).__name__}, not an object")
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            msg = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            return UNREADABLE, f"results.json is truncated or not JSON ({msg})"
        st = res.get("status")
        if st == FAILED:
            return FAILED, str(res.get("error") or "failed without an error message")
        if st not in (None, COMPLETE):
            return FAILED, f"unknown status {st!r} in results.json (valid: complete, failed)"
        if not isinstance(res.get("metrics"), dict) or not res["metrics"]:
            return UNREADABLE, "results.json has no metrics"
        return COMPLETE, ""

    def method_label(self) -> str:
        res = self.results() or {}
        cfg = res.get("config") or self.config_dict()
        return label_of(res.get("method") or (cfg.get("method") or {}).get("name"), cfg.get("method"),
                        self.hydra_choice("method"), res.get("method_label"))

    def adapter(self) -> dict:
        """The saved LoRA + head tensors of this (member) directory."""
        return self._load(self.checkpoints / "adapter.pt", required=True)

    def method_state(self) -> dict:
        """The saved method state (``{}`` when the run saved none)."""
        return self._load(self.checkpoints / "method_state.pt", required=False)

    def predictions(self, split: str) -> dict:
        import numpy as np

        path = self.predictions_path(split)
        if not path.is_file():
            raise UqloraError(f"run directory '{self.path}' has no predictions for split '{split}' ({path})")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _load(self, path: Path, required: bool) -> dict:
        import torch

        if not path.is_file():
            if required:
                raise UqloraError(f"run directory '{self.path}' has no {path.relative_to(self.path)}")
            return {}
        return torch.load(path, weights_only=True, map_location="cpu")

    # --- writing --------------------------------------------------------------------------------------------
    def save_adapter(self, state: dict) -> Path:
        from uqlora.io import atomic_torch_save

        return atomic_torch_save(state, self.checkpoints / "adapter.pt")

    def save_peft_adapter(self, files: dict[str, bytes | None], folder: str | Path | None = None) -> Path:
        """Write the PEFT-format files (name -> content; None removes a stale file) into :attr:`adapter_dir`
        (or ``folder``), each atomically; returns the folder."""
        from uqlora.distributed import is_global_zero
        from uqlora.io import atomic_write

        out = Path(folder) if folder is not None else self.adapter_dir
        for name, content in files.items():
            if content is None:
                if is_global_zero():
                    (out / name).unlink(missing_ok=True)
            else:
                atomic_write(out / name, lambda f, c=content: f.write(c))
        return out

    def save_method_state(self, state: dict) -> Path:
        from uqlora.io import atomic_torch_save

        return atomic_torch_save(state, self.checkpoints / "method_state.pt")

    def write_results(self, results: dict) -> Path:
        from uqlora.io import atomic_json

        return atomic_json(results, self.results_path)


def is_complete(res: dict | None) -> bool:
    return res is not None and res.get("status", COMPLETE) == COMPLETE and isinstance(res.get("metrics"), dict)
