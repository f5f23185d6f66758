"""The foundation's acceptance commands, verbatim, on the full test sets (slow: ~30 min on 2 CPU cores;
`make test-slow`). Each must write results.json, predictions/test.npz and plots/reliability_test.png."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline"}


@pytest.mark.parametrize("model,data,n_test,C", [("minilm", "sst2", 1821, 2), ("smollm2_135m", "sst2", 1821, 2),
                                                 ("smollm2_135m", "arc_e", 2376, 5)])
def test_acceptance_command_writes_the_run_directory(tmp_path, model, data, n_test, C):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", f"model={model}", f"data={data}", "trainer.max_steps=30",
                        "progress_bar=none", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["metrics"]["test"]["n"] == n_test
    pred = np.load(run_dir / "predictions" / "test.npz")
    assert pred["probs"].shape == (n_test, C)
    assert (run_dir / "plots" / "reliability_test.png").stat().st_size > 1000
    assert "ACC" in p.stdout and "reliability_test.png" in p.stdout
