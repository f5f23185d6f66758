"""The contract every registered method keeps (laplace-torch's serialization tests, for all of ours): it composes,
trains or fits on a tiny model, saves its state, `eval.py` reloads the run directory to identical predictions,
a checkpoint of another model is refused in one line, and predicting before fitting raises a clear error.

A method added later (one core file + one methods module + one yaml) is picked up here automatically; only a
method that cannot run with its defaults on a tiny model needs an entry in ``OPTIONS``.
"""
import numpy as np
import pytest
from omegaconf import open_dict

from conftest import compose
from test_swag import _save_hydra
from uqlora.build import build_member, load_task, setup
from uqlora.context import RunContext
from uqlora.errors import UqloraError
from uqlora.methods import METHODS, discover
from uqlora.rundir import RunDir
from uqlora.sources import restore_member
from uqlora.tasks import evaluate_run, train

discover()
TINY = ["model=tiny_bert", "debug=fast", "logger=none", "progress_bar=none", "print_table=false",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "data.max_train_samples=48",
        "data.max_test_samples=16", "data.max_calib_samples=16", "data.max_val_samples=16", "data.batch_size=8"]
# the smallest settings under which each method does its whole job on a tiny model in a few seconds
OPTIONS = {
    "swag": ["method.collect_every=1", "method.num_samples=2"],
    "multiswag": ["method.collect_every=1", "method.num_samples=2", "method.num_models=2"],
    "ensemble": ["method.num_models=2"],
    "mc_dropout": ["method.num_samples=2"],
    "laplace": ["method.prior.steps=5"],
    "adue": ["method.grid.lr=[1e-3]", "method.grid.alpha_reg=[0.1]", "method.grid.alpha_l2sp=[0.1]", "method.epochs=2"],
    "ual": ["method.uncertainty_source=teacher"],  # + method.teacher_run: the MAP run below
    "blob": ["method.num_samples=2"],
    "scalabl": ["method.num_samples=2"],
    "tfb": ["method.num_samples=2", "method.search_iters=2", "method.anchor_size=16"],
}
def assert_eval_reproduces(run, out_dir, metrics) -> None:
    """``eval.py run_dir=<run>`` writes, from the run directory alone, the run's test predictions (floats to 1e-6,
    the rest exactly) and its test NLL."""
    ecfg = compose([f"run_dir={run}"], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
    again, _ = evaluate_run(ecfg, RunContext(out_dir))
    first, second = RunDir(run).predictions("test"), RunDir(out_dir).predictions("test")
    assert set(first) == set(second)
    for key in first:
        if first[key].dtype.kind == "f":
            np.testing.assert_allclose(second[key], first[key], atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(second[key], first[key], err_msg=key)
    assert again["test"]["nll"] == pytest.approx(metrics["test"]["nll"], abs=1e-6)


NEEDS_MAP_RUN = {"ual": "method.teacher_run", "tfb": "method.map_run"}


def _cfg(tmp_path, name, *overrides):
    cfg = compose([*TINY, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / name)
    return cfg


@pytest.fixture(scope="module")
def map_run(tmp_path_factory):
    """A finished MAP run (the teacher / source of the methods that need one)."""
    tmp = tmp_path_factory.mktemp("map")
    cfg = _cfg(tmp, "map", "method=map")
    _, objs = train(cfg)
    _save_hydra(cfg, objs["run_dir"])
    return objs["run_dir"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(tmp_path, map_run, name):
    extra = list(OPTIONS.get(name, []))
    if name in NEEDS_MAP_RUN:
        extra.append(f"{NEEDS_MAP_RUN[name]}={map_run}")
    cfg = _cfg(tmp_path, "run", f"method={name}", *extra)

    # predicting before the method was fitted (trained or post-hoc fitted) is refused in one line
    method, dm = setup(cfg)
    from uqlora.build import build_trainer

    with pytest.raises(UqloraError, match="before it was fitted") as e:
        build_trainer(cfg, tmp_path / "t", False, []).predict(method, dataloaders=dm.loader("test"))
    assert "\n" not in str(e.value)

    metrics, objs = train(cfg)
    run = objs["run_dir"]
    assert (run / "checkpoints" / "adapter.pt").is_file() or (run / "members" / "0" / "checkpoints" / "adapter.pt").is_file()
    _save_hydra(cfg, run)

    # eval.py: the run directory alone reproduces the predictions (adapters + saved method states, no refit)
    assert_eval_reproduces(run, tmp_path / "eval", metrics)

    # a checkpoint of another model (another LoRA rank) is refused in one line
    other = _cfg(tmp_path, "other", f"method={name}", *extra, "model.lora.r=4")
    m2, _ = build_member(other, load_task(other), 0)
    with pytest.raises(UqloraError, match="does not match this model") as e:
        restore_member(other, m2, RunDir(run).members()[0])
    assert "\n" not in str(e.value)
