"""Every option of every config group composes, and typos fail at composition time."""
import pytest

from uqlora.errors import UqloraError
from omegaconf import OmegaConf

from conftest import CONF, compose

GROUPS = ["model", "data", "method", "trainer", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None
    container = OmegaConf.to_container(cfg, resolve=True)  # all interpolations resolve
    assert container["method"]["name"] in options("method")
    if group == "data":
        assert cfg.data.name == option
    if group == "model":
        assert cfg.model.name == option and cfg.model.kind in ("encoder", "causal")


@pytest.mark.parametrize("exp", options("experiment"))
def test_experiments_compose(exp):
    cfg = compose([f"experiment={exp}"])
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("dbg", options("debug"))
def test_debug_compose(dbg):
    cfg = compose([f"debug={dbg}"])
    assert cfg.trainer.max_steps > 0


def test_misspelled_method_key_fails_at_composition():
    with pytest.raises(UqloraError, match="nosuchkey"):  # conftest.compose reports Hydra's error as one line
        compose(["method.nosuchkey=1"])


def test_joblib_launcher_composes():
    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert "joblib" in cfg.hydra.launcher._target_.lower()


def test_trust_remote_code_off_everywhere():
    for opt in options("model"):
        assert compose([f"model={opt}"]).model.trust_remote_code is False
