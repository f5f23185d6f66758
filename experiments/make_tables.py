"""Paper tables and figures from logged runs (run directories, multirun folders or W&B): the command line of
:mod:`uqlora.results` -- `python experiments/make_tables.py --help` for the options, `make tables RUNS=...`.

    python experiments/make_tables.py multirun/laplace_lora/<stamp> --out tables/laplace_lora
    python experiments/make_tables.py --wandb <entity>/<project> --group laplace_lora --out tables/ll
"""
import sys

from uqlora.results.cli import main

if __name__ == "__main__":
    sys.exit(main())
