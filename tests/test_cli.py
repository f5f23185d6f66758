"""Bad input fails before anything runs, with one clear line naming the bad value and the valid choices."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline"}


def run(*args, script="train.py", timeout=300):
    t0 = time.time()
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    return p, time.time() - t0


def error_line(p):
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args,bad,valid", [
    (["method=nosuch"], "nosuch", "map"),
    (["data=nosuch"], "nosuch", "sst2"),
    (["model=nosuch"], "nosuch", "minilm"),
    (["-m", "method=map,nosuch2"], "nosuch2", "map"),
    (["method.lrr=1"], "method.lrr", "name"),
    (["model.lora.rr=4"], "model.lora.rr", "target_modules"),
])
def test_unknown_choice_or_key_is_one_line(tmp_path, args, bad, valid):
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    p, _ = run(*args, f"{where}={tmp_path}/r")
    assert p.returncode != 0
    line = error_line(p)
    assert bad in line and valid in line
    assert not (tmp_path / "r").exists()  # refused before Hydra made a run directory: nothing ran


def test_missing_data_folder_is_one_line(tmp_path):
    p, _ = run("model=tiny_bert", "logger=none", f"paths.data_dir={tmp_path}/nodata", f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 1
    line = error_line(p)
    assert "sst2" in line and "nodata" in line and "stanfordnlp/sst2" in line
    assert not (tmp_path / "r" / "checkpoints").exists()  # the data is read before any model or training


def test_offline_hub_model_is_one_line(tmp_path):
    p, _ = run("model=roberta_base", "logger=none", f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 1
    line = error_line(p)
    assert "FacebookAI/roberta-base" in line and "minilm" in line and "offline" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_help_and_cfg_job():
    p, _ = run("--help")
    assert p.returncode == 0 and "model" in p.stdout and "method" in p.stdout
    p, _ = run("--cfg", "job")
    assert p.returncode == 0
    assert "name: map" in p.stdout and "lora:" in p.stdout


def test_eval_requires_a_run_dir(tmp_path):
    p, _ = run(f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path}/e", script="eval.py")
    assert p.returncode == 1
    assert "not a run directory" in error_line(p)


TINY = ["debug=fast", "trainer.max_steps=2", "data.max_test_samples=16", "data.max_val_samples=8",
        "progress_bar=none"]


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_writes_one_run_dir_per_member(tmp_path, launcher):
    args = ["-m", "model=tiny_bert,tiny_llama", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"]
    if launcher == "joblib":
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    p, _ = run(*args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    import json

    models = sorted(json.loads(r.read_text())["model"] for r in results)
    assert models == ["tiny_bert", "tiny_llama"]


def test_wandb_offline_run_logs_reliability_diagram(tmp_path):
    p, _ = run("model=tiny_bert", *TINY, "logger.kind=wandb", f"hydra.run.dir={tmp_path}/r", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/**/*.png"))
    assert any("reliability" in str(i) for i in images), images
    assert "ACC" in p.stdout and "reliability_test.png" in p.stdout
