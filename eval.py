"""Re-evaluate a finished run directory without retraining, on its own or another data config.

    python eval.py run_dir=outputs/2026-11-21/12-00-00_map_sst2_ab12cd
    python eval.py run_dir=<an ARC-Easy run> data=arc_c eval.splits=[test]   # another dataset, same task

Results go to ``<run_dir>/eval/<time>_<uid>/`` (never over the original run's files).
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from uqlora.cli import guard, precheck  # noqa: E402
from uqlora.config import register_configs  # noqa: E402
from uqlora.context import RunContext  # noqa: E402

register_configs()


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from uqlora.tasks import evaluate_run

    with guard():
        evaluate_run(cfg, RunContext.from_hydra())


if __name__ == "__main__":
    precheck("eval")
    main()
