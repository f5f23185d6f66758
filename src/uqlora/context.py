"""Where a run happens and how it was launched: the only place that reads Hydra's global state.

The entry points (``train.py``, ``eval.py``) build a :class:`RunContext` from Hydra's job (:meth:`RunContext.from_hydra`)
and pass it down; every library function takes the run directory and the Hydra options from it instead of
reading globals, so the same functions run from tests and notebooks with ``RunContext(run_dir=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    choices: Mapping[str, str] = field(default_factory=dict)  # Hydra's config-group options (method: laplace_ll)
    multirun: bool = False                                     # a member of a sweep (-m)
    hydra_job: bool = False                                    # started by @hydra.main (Lightning may re-launch it)

    @classmethod
    def from_hydra(cls) -> "RunContext":
        """The running Hydra job's output directory, its group choices and mode."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        choices = {str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None}
        return cls(Path(hc.runtime.output_dir), choices, hc.mode == RunMode.MULTIRUN, True)

    @classmethod
    def for_config(cls, cfg, default: str = "outputs/manual") -> "RunContext":
        """Outside Hydra (tests, notebooks): ``cfg.run_dir`` when set, else ``default``."""
        return cls(Path(cfg.get("run_dir") or default))

    @classmethod
    def current(cls, cfg) -> "RunContext":
        """The Hydra job's context when one is running, else :meth:`for_config`."""
        try:
            return cls.from_hydra()
        except (ValueError, ImportError):
            return cls.for_config(cfg)

    def method_label(self, cfg) -> str:
        """The method option as chosen (``laplace_ll``, ``swag_lora``, ...; tables and run directories use
        it), falling back to the method's name."""
        return str(self.choices.get("method") or cfg.method.name)
