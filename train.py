"""Fine-tune, fit the uncertainty method, evaluate, write the run directory.

    python train.py                                  # the default experiment (see conf/config.yaml)
    python train.py model=minilm data=sst2 method=map trainer.max_steps=30
    python train.py -m method=map model=minilm,smollm2_135m
"""
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from uqlora.cli import FAILED_MEMBERS, guard, note_member_error, precheck  # noqa: E402
from uqlora.config import register_configs  # noqa: E402
from uqlora.context import RunContext  # noqa: E402

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from uqlora.tasks import train

    ctx = RunContext.from_hydra()
    if ctx.multirun:  # a failing member is recorded (results.json: status failed) and the sweep goes on
        from uqlora.logging_utils import finish

        try:
            metrics, _ = train(cfg, ctx)
        except Exception as e:
            note_member_error(e, ctx.run_dir)
            return float("nan")
        finally:
            finish()  # the next member of this process starts its own W&B run
    else:
        with guard():
            metrics, _ = train(cfg, ctx)
    key = cfg.get("optimized_metric")
    if key:
        split, name = key.split("/", 1)
        return float(metrics[split][name])
    return None


if __name__ == "__main__":
    precheck("config")
    main()
    if FAILED_MEMBERS:  # filled by the SweepReport callback after a multirun
        sys.exit(1)
