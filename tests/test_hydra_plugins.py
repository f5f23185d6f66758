"""Hydra plugins: the SLURM launcher (hydra-submitit-launcher) composes into a submitit job that asks for one
GPU per job; the Optuna searches (hydra-optuna-sweeper) compose, tune on the validation NLL that train.py
returns, and a real 3-trial search runs end to end; plain grid sweeps keep Hydra's basic sweeper."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF, ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
SEARCHES = {  # option -> (method, {parameter: kind})
    "lora_map": ("map", {"optim.lr": "interval", "optim.weight_decay": "interval", "model.lora.r": "choice"}),
    "laplace": ("laplace", {"method.prior.init": "interval"}),
    "swag": ("swag", {"method.lr": "interval", "method.max_rank": "choice"}),
}


def _hydra_cfg(overrides):
    from hydra import compose, initialize_config_dir

    from uqlora.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# --- SLURM ----------------------------------------------------------------------------------------------------
def test_slurm_launcher_composes_to_a_one_gpu_submitit_job(tmp_path, monkeypatch):
    # `--cfg hydra` prints the composed Hydra config (Hydra refuses --cfg together with -m; the launcher node is
    # the same either way)
    p = _train("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", "--cfg", "hydra", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    launcher = OmegaConf.create(yaml.safe_load(p.stdout))["hydra"]["launcher"]
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1 and launcher.timeout_min >= 60
    assert launcher.partition is None and launcher.array_parallelism >= 1
    assert launcher.submitit_folder == f"{tmp_path}/sweep/.submitit/%j"  # inside the sweep folder

    # what the plugin hands to submitit (SlurmLauncher.launch): submitit accepts every key and writes the sbatch
    # script; submitit only looks for an `srun` executable here, nothing is submitted
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    ex = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                               slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                            if k not in ("submitit_folder", "max_num_timeout")})
    script = ex._executor._make_submission_file_text("python -u train.py", "uid")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", f"--cpus-per-task={launcher.cpus_per_task}",
                 f"--mem={launcher.mem_gb}GB", f"--time={launcher.timeout_min}", "--nodes=1"):
        assert f"#SBATCH {line}\n" in script, script
    assert "--partition" not in script  # null: the cluster's default partition


# --- Optuna ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_hparams_search_composes_an_optuna_study_on_the_validation_nll(search):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    method, space = SEARCHES[search]
    cfg = _hydra_cfg([f"hparams_search={search}"])
    sw = cfg.hydra.sweeper
    assert sw._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sw.direction == "minimize" and sw.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.optimized_metric == "val/nll" and "val" in cfg.eval.splits  # the tuned metric is computed
    assert cfg.method.name == method and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(sw.params).keys() == space.keys()
    for key, kind in space.items():
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key  # the tuned key exists
        (ov,) = OverridesParser.create().parse_overrides([f"{key}={sw.params[key]}"])
        assert ov.is_sweep_override() and type(ov.value()).__name__.lower().startswith(kind), (key, ov.value())
    if search == "laplace":
        assert cfg.method.prior.method == "fixed"  # the trial's precision is used as is


def test_plain_multirun_keeps_the_basic_sweeper():
    cfg = _hydra_cfg(["method=map"])
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert cfg.optimized_metric == "test/nll"
    # a search's method can still be overridden on the command line
    assert _hydra_cfg(["hparams_search=lora_map", "method=swag"]).method.name == "swag"


def test_optuna_search_runs_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    p = _train("hparams_search=lora_map", "model=tiny_bert", "debug=fast", "logger=none", "progress_bar=none",
               "print_table=false", "trainer.max_steps=2", "data.max_train_samples=16", "data.max_val_samples=16",
               "data.max_test_samples=16", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
               f"hydra.sweep.dir={sweep}", timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == set(SEARCHES["lora_map"][1])
    trials = [json.loads(r.read_text()) for r in sorted(sweep.glob("*/results.json"))]
    assert len(trials) == 3
    vals = [t["metrics"]["val"]["nll"] for t in trials]  # val evaluated in every trial; test reported alongside
    assert all("test" in t["metrics"] for t in trials)
    assert best["best_value"] == pytest.approx(min(vals), rel=1e-12)  # train.py returned val/nll to the sweeper
    winner = trials[vals.index(min(vals))]["config"]
    assert winner["optim"]["lr"] == pytest.approx(best["best_params"]["optim.lr"])
    assert winner["model"]["lora"]["r"] == best["best_params"]["model.lora.r"]
    for t in trials:
        c = t["config"]
        assert 1e-5 <= c["optim"]["lr"] <= 3e-3 and 1e-4 <= c["optim"]["weight_decay"] <= 1.0
        assert c["model"]["lora"]["r"] in (4, 8, 16, 32)


# --- the command-line precheck --------------------------------------------------------------------------------
def test_precheck_accepts_launchers_searches_and_strategies():
    from uqlora.cli import check_overrides
    from uqlora.errors import UqloraError

    check_overrides(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hparams_search=laplace",
                     "trainer=ddp", "trainer.devices=2", "trainer.strategy.find_unused_parameters=true"])
    check_overrides(["hydra/launcher=joblib", "hparams_search=swag", "trainer=fsdp",
                     "trainer.strategy.sharding_strategy=SHARD_GRAD_OP"])
    with pytest.raises(UqloraError, match="valid choices: laplace, lora_map, swag"):
        check_overrides(["hparams_search=nosuch"])
    with pytest.raises(UqloraError, match="trainer.strategy.nosuch"):
        check_overrides(["trainer=ddp", "trainer.strategy.nosuch=1"])
