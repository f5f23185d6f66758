import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides=(), config_name="config"):
    """The composed config of train.py for these overrides (no Hydra run directory)."""
    from hydra import compose as hcompose, initialize_config_dir
    from uqlora.config import register_configs

    from uqlora.errors import UqloraError
    from uqlora.overrides import _one_line

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        try:
            return hcompose(config_name=config_name, overrides=list(overrides))
        except Exception as e:  # what train.py's override check prints: one line naming the key and the choices
            raise UqloraError(_one_line(e)) from None


def run_cfg(tmp_path, overrides=()):
    from omegaconf import open_dict

    cfg = compose(["logger=none", "progress_bar=none", "print_table=false", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    return lambda *overrides: run_cfg(tmp_path, overrides)
