"""The committed LLM-table results are reproducible from the repository alone: `make tables` on the committed runs
builds the committed tables, and a cell pooled from separate runs (`eval.py ensemble=[...]`) is what its
members' committed predictions pool to."""
import json
import subprocess
import sys

import pytest
from omegaconf import open_dict

from conftest import ROOT, compose
from uqlora.context import RunContext
from uqlora.tasks import evaluate_run

LLM = ROOT / "experiments" / "results" / "laplace_lora_cpu"
RUNS, ABL = LLM / "runs", LLM / "ablations"

# (the runs `make tables` reads, the committed output folder): the README's commands
TABLES = [
    ([RUNS], LLM / "tables"),
    ([RUNS / "arc_e_s0", RUNS / "arc_c_s0", RUNS / "obqa_s0"], LLM / "tables_seed0"),
    ([ABL / "arc_c_s0_float32",
      *(RUNS / "arc_c_s0" / f"{r}_smollm2_135m_arc_c_s0" for r in ("7_blob", "8_ensemble", "9_multiswag"))],
     ABL / "tables_arc_c_s0_float32"),
    ([ABL / "arc_e_s0_float32",
      *(RUNS / "arc_e_s0" / f"{r}_smollm2_135m_arc_e_s0"
        for r in ("4_tfb", "5_mc_dropout", "7_blob", "9_multiswag"))],
     ABL / "tables_arc_e_s0_float32"),
]

# a pooled cell: its committed run and the committed runs it pools, in order
POOLS = {
    "arc_c_ensemble": (RUNS / "arc_c_s0" / "8_ensemble_smollm2_135m_arc_c_s0",
                       [ABL / "arc_c_s0_float32" / "0_map_smollm2_135m_arc_c_s0",
                        *(ABL / "arc_c_s0_float32_members" / f"0_map_init{i}_smollm2_135m_arc_c_s0"
                          for i in range(1, 5))]),
    "arc_e_multiswag": (RUNS / "arc_e_s0" / "9_multiswag_smollm2_135m_arc_e_s0",
                        [ABL / "arc_e_s0_float32" / "6_swag_smollm2_135m_arc_e_s0",
                         *(ABL / "arc_e_s0_float32_swag_members" / f"6_swag_init{i}_smollm2_135m_arc_e_s0"
                           for i in (1, 2))]),
    "arc_c_multiswag": (RUNS / "arc_c_s0" / "9_multiswag_smollm2_135m_arc_c_s0",
                        [ABL / "arc_c_s0_float32" / "6_swag_smollm2_135m_arc_c_s0",
                         *(ABL / "arc_c_s0_float32_swag_members" / f"6_swag_init{i}_smollm2_135m_arc_c_s0"
                           for i in (1, 2))]),
}


@pytest.mark.parametrize("runs,committed", TABLES, ids=[t[1].name for t in TABLES])
def test_committed_tables_are_what_make_tables_builds(tmp_path, runs, committed):
    out = tmp_path / "tables"  # the runs named relative to the checkout, as the README's commands do
    subprocess.run([sys.executable, str(ROOT / "experiments" / "make_tables.py"),
                    *(str(r.relative_to(ROOT)) for r in runs), "--out", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    for name in ("tables.md", "paired.md", "summary.csv"):
        assert (out / name).read_text() == (committed / name).read_text(), f"{committed / name} is out of date"


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pooled_cells_are_their_members_committed_predictions_pooled(tmp_path, name):
    cell, members = POOLS[name]
    ecfg = compose(["run_dir=unused", "from_predictions=true"], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
        ecfg.ensemble = [str(m) for m in members]
    metrics, objs = evaluate_run(ecfg, RunContext(tmp_path / "pool"))
    want = json.loads((cell / "results.json").read_text())
    assert (objs["results"]["method"], objs["results"]["num_models"]) == (want["method"], want["num_models"])
    assert metrics["test"].keys() == want["metrics"]["test"].keys()
    for key, value in want["metrics"]["test"].items():
        assert metrics["test"][key] == pytest.approx(value, abs=1e-9), key
