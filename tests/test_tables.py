"""uqlora.results (experiments/make_tables.py) on synthetic run directories with known answers: mean +- std
over seeds, the best value per column in bold (max or min by metric), missing / failed / truncated /
never-started runs reported, pooled reliability = the reliability of the concatenated predictions, one-line
errors, the row order and display names, the sweep jobs expanded as Hydra's basic sweeper does."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from uqlora import results as mt


def write_run(root, name, method="map", data="d1", seed=0, metrics=None, model="m", status=None, error=None,
              subset=None, choice=None, overrides=None, probs=None, labels=None, extra=None, job=None, display=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    mcfg = {"name": method, **({"subset": subset} if subset else {}), **({"display_name": display} if display else {})}
    cfg = {"method": mcfg, "model": {"name": model}, "data": {"name": data}, "seed": seed}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if choice or job is not None:
        hydra = {"runtime": {"choices": {"method": choice}}} if choice else {}
        hydra.update({"job": {"num": job}} if job is not None else {})
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    if overrides is not None:
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None or status:
        res = {"method": method, "model": model, "data": data, "seed": seed, "config": cfg,
               "timings": {"total": 12.0}, **(extra or {})}
        if metrics is not None:
            res["metrics"] = {"test": metrics}
        if status:
            res["status"] = status
        if error:
            res["error"] = error
        (d / "results.json").write_text(json.dumps(res))
    if probs is not None:
        (d / "predictions").mkdir()
        np.savez(d / "predictions" / "test.npz", probs=np.asarray(probs, float), labels=np.asarray(labels),
                 ids=np.arange(len(labels)).astype(str))
    return d


ACC = {("map", "d1"): [0.80, 0.82, 0.84], ("laplace", "d1"): [0.81, 0.81, 0.84],
       ("map", "d2"): [0.60, 0.70, 0.80], ("laplace", "d2"): [0.70, 0.72, 0.74]}
ECE = {("map", "d1"): [0.10, 0.12, 0.14], ("laplace", "d1"): [0.03, 0.04, 0.05],
       ("map", "d2"): [0.20, 0.20, 0.20], ("laplace", "d2"): [0.30, 0.30, 0.33]}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    i = 0
    for (method, data), accs in ACC.items():
        for seed, acc in enumerate(accs):
            write_run(root, f"{i}_{method}_{data}_s{seed}", method, data, seed,
                      {"acc": acc, "ece": ECE[(method, data)][seed], "nll": 0.5 + seed / 10})
            i += 1
    return root


def table(tables, metric):
    (t,) = [t for t in tables if t.metric == metric]
    return t


def test_mean_std_and_bold_known_answer(sweep):
    runs = mt.load_runs([sweep])
    tables = mt.build_tables(runs, "test")
    acc, ece = table(tables, "acc"), table(tables, "ece")
    assert acc.cols == ["d1", "d2"] and acc.rows == ["map", "laplace"]
    c = acc.cells[("map", "d2")]
    assert c.n == 3 and c.mean == pytest.approx(0.70) and c.std == pytest.approx(0.10)  # sample std (ddof=1)
    md = mt.to_markdown(acc).splitlines()
    # d1: both methods have mean 82.0% -> both bold (a tie); d2: laplace 72.0 beats map 70.0 (max is best)
    assert "| MAP | **82.0 ± 2.0** | 70.0 ± 10.0 |" in md
    assert "| Laplace-LoRA | **82.0 ± 1.7** | **72.0 ± 2.0** |" in md
    md = mt.to_markdown(ece).splitlines()  # ECE: the minimum is best
    assert "| MAP | 12.0 ± 2.0 | **20.0 ± 0.0** |" in md
    assert "| Laplace-LoRA | **4.0 ± 1.0** | 31.0 ± 1.7 |" in md
    tex = mt.to_latex(ece)
    assert r"Laplace-LoRA & $\mathbf{4.0 \pm 1.0}$ & $31.0 \pm 1.7$ \\" in tex
    assert r"\toprule" in tex and r"$\downarrow$" in tex
    nll = table(tables, "nll")  # every run has nll 0.5 + seed / 10 -> 0.600 +- 0.100 everywhere, all bold
    assert all(nll.best(col) == {"map", "laplace"} for col in nll.cols)
    assert "**0.600 ± 0.100**" in mt.to_markdown(nll)


def test_mean_confidence_is_a_default_table_in_percent_without_a_best(tmp_path):
    """The confidence direction (mean confidence next to ACC) is tabulated; neither way is better, so no bold."""
    for i, (method, conf) in enumerate((("map", 0.861), ("laplace", 0.55))):
        write_run(tmp_path, str(i), method, "d1", 0, metrics={"acc": 0.62, "mean_confidence": conf, "ece": 0.2})
    tables = mt.build_tables(mt.load_runs([tmp_path]), "test")
    assert [t.metric for t in tables][:3] == ["acc", "mean_confidence", "ece"]
    md = mt.to_markdown(table(tables, "mean_confidence")).splitlines()
    assert "| MAP | 86.1 |" in md and "| Laplace-LoRA | 55.0 |" in md and "(%)" in md[0]


def test_direction_of_every_metric():
    for m in ("acc", "auroc_misclf", "auprc_misclf", "errdet_auroc", "ood_max_prob_auroc", "ood_neg_entropy_aupr_in"):
        assert mt.higher_is_better(m) is True, m
    for m in ("ece", "mce", "nll", "brier", "aurc", "eaurc", "aurc_entropy", "errdet_aurc", "errdet_ece",
              "ood_max_prob_fpr95"):
        assert mt.higher_is_better(m) is False, m
    assert mt.higher_is_better("mean_confidence") is None


def test_missing_failed_truncated_runs_are_reported(sweep, tmp_path, capsys):
    write_run(sweep, "20_map_d3_s0", data="d3", status="failed", error="CUDA out of memory")
    bad = write_run(sweep, "21_map_d3_s1", data="d3", seed=1, metrics={"acc": 0.5})
    (bad / "results.json").write_text((bad / "results.json").read_text()[:25])  # killed mid-write
    write_run(sweep, "22_map_d3_s2", data="d3", seed=2)  # .hydra only: still running / killed
    write_run(sweep, "23_map_d3_s3", data="d3", seed=3, metrics={"acc": 0.9}, status="complete")  # explicit
    runs = mt.load_runs([sweep])
    status = {r.path.name: r.status for r in runs}
    assert status["20_map_d3_s0"] == "failed" and status["21_map_d3_s1"] == "unreadable"
    assert status["22_map_d3_s2"] == "missing" and status["23_map_d3_s3"] == "complete"
    assert all(s == "complete" for n, s in status.items() if not n.startswith("2") or n.startswith("23"))
    out = tmp_path / "out"
    assert mt.main([str(sweep), "--out", str(out), "--figures", "none"]) == 0
    printed = capsys.readouterr().out
    md = (out / "tables.md").read_text()
    for text in ("failed: map / m / d3 / seed 0", "CUDA out of memory", "unreadable: map / m / d3 / seed 1",
                 "truncated or not JSON", "missing: map / m / d3 / seed 2", "no results.json"):
        assert text in printed and text in md, text
    missing_section = md.split("## Missing / failed runs")[1].split("## Runs")[0]
    assert "seed 3" not in missing_section  # the complete one is in the tables
    acc = md.split("### ACC")[1].split("###")[0]
    assert "| MAP | **82.0 ± 2.0** | 70.0 ± 10.0 | **90.0** (n=1) |" in acc  # d3: one seed, marked
    assert mt.main([str(sweep), "--out", str(out), "--figures", "none", "--strict"]) == 1


def test_duplicates_keep_the_newest(tmp_path):
    import os

    root = tmp_path / "runs"
    old = write_run(root, "a", metrics={"acc": 0.1})
    new = write_run(root, "b", metrics={"acc": 0.9})
    os.utime(old / "results.json", (1, 1))
    runs = mt.load_runs([root])
    (t,) = mt.build_tables(runs, "test", ["acc"])
    assert t.cells[("map", "d1")].values == [0.9]
    assert any("duplicate" in ln and str(old) in ln for ln in mt.status_lines(runs))
    assert str(new) not in "".join(mt.status_lines(runs))


def test_method_labels_last_layer_laplace_and_options(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "0", "laplace", subset="last_layer", metrics={"acc": 0.5})
    write_run(root, "1", "laplace", subset="all", metrics={"acc": 0.6})
    write_run(root, "2", "swag", choice="swag_lora", metrics={"acc": 0.7})
    write_run(root, "3", "laplace", choice="laplace_ll", subset="last_layer", metrics={"acc": 0.8})
    write_run(root, "4", "map", metrics={"acc": 0.8}, extra={"method_label": "map_ls"})
    labels = [r.method for r in mt.load_runs([root])]
    assert labels == ["laplace_ll", "laplace", "swag_lora", "laplace_ll", "map_ls"]
    md = mt.to_markdown(mt.build_tables(mt.load_runs([root / "0"], ), "test", ["acc"])[0])
    assert "| LLLA |" in md


def test_errdet_view_rows_are_scores(tmp_path):
    root = tmp_path / "runs"
    for seed, (sr, maha, adue) in enumerate([(0.70, 0.60, 0.75), (0.72, 0.62, 0.71)]):
        write_run(root, f"{seed}", "adue", "sst2", seed, {
            "acc": 0.9, "errdet_sr_auroc": sr, "errdet_mahalanobis_auroc": maha, "errdet_adue_auroc": adue,
            "errdet_sr_aurc": 0.1, "errdet_mahalanobis_aurc": 0.2, "errdet_adue_aurc": 0.05})
    tables = mt.build_tables(mt.load_runs([root]), "test")
    auroc = [t for t in tables if t.metric == "errdet_auroc"][0]
    assert auroc.view == "errdet" and auroc.rows == ["sr", "mahalanobis", "adue"]
    md = mt.to_markdown(auroc)
    assert "| SR | 0.710 ± 0.014 |" in md and "| Mahalanobis | 0.610 ± 0.014 |" in md
    assert "| AdUE | **0.730 ± 0.028** |" in md
    aurc = [t for t in tables if t.metric == "errdet_aurc"][0]
    assert aurc.best("sst2") == {"adue"}  # lower AURC is better


def test_not_started_jobs_of_a_sweep(tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"seed": "0,1", "method": "map,laplace_ll"}},
        "overrides": {"task": ["experiment=x", "data=d1"]}}}, sort_keys=False))
    done = [("0", "map"), ("0", "laplace_ll"), ("1", "map")]
    for i, (seed, method) in enumerate(done):
        write_run(sweep, f"{i}", "laplace" if "laplace" in method else method, "d1", int(seed), {"acc": 0.5},
                  overrides=[f"seed={seed}", f"method={method}", "experiment=x", "data=d1"])
    runs = mt.load_runs([sweep])
    missing = [r for r in runs if r.status == "not started"]
    assert len(missing) == 1 and missing[0].method == "laplace_ll" and missing[0].seed == 1
    assert "seed=1 method=laplace_ll" in missing[0].error


def test_a_resumed_sweep_expects_the_jobs_of_its_first_launch(tmp_path):
    """`resume=true` on the relaunch is recorded in multirun.yaml but not in the runs the first launch made:
    those runs still count, and only the job without a folder is missing."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"method": "map,temperature,swag"}},
        "overrides": {"task": ["experiment=x", "data=d1", "seed=0", "resume=true"]}}}, sort_keys=False))
    for i, method in enumerate(["map", "temperature"]):
        write_run(sweep, f"{i}", method, "d1", 0, {"acc": 0.5},
                  overrides=["experiment=x", "data=d1", "seed=0", f"method={method}"])
    runs = mt.load_runs([sweep])
    missing = [r for r in runs if r.status == "not started"]
    assert [(r.method, r.seed) for r in missing] == [("swag", 0)]
    assert sum(r.status == "complete" for r in runs) == 2


def test_pooled_reliability_equals_concatenated_predictions(tmp_path):
    from uqlora.metrics import ece

    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    all_p, all_y = [], []
    for seed in range(3):
        p = rng.dirichlet(np.ones(3), size=50 + 10 * seed)
        y = rng.integers(0, 3, size=len(p))
        write_run(root, f"{seed}", seed=seed, metrics={"acc": 0.5, "ece": 0.1}, probs=p, labels=y)
        all_p.append(p)
        all_y.append(y)
    runs = mt.load_runs([root])
    pooled = mt.pooled_reliability(runs, "test")
    assert pooled["count"].sum() == sum(len(y) for y in all_y)
    assert pooled["ece"] == pytest.approx(ece(np.concatenate(all_p), np.concatenate(all_y), 15), abs=1e-12)
    tables = mt.build_tables(runs, "test")
    paths, notes = mt.make_figures(runs, tables, tmp_path / "fig")
    names = sorted(p.name for p in paths)
    for stem in ("reliability_m_d1_test", "risk_coverage_m_d1_test", "bars_m"):
        assert f"{stem}.pdf" in names and f"{stem}.png" in names
    assert all(p.stat().st_size > 1000 for p in paths) and notes == []


def test_mean_risk_coverage_known_answer(tmp_path):
    root = tmp_path / "runs"
    # confidences rank the one wrong example last: risk 0 until coverage 3/4, then 1/4
    write_run(root, "0", metrics={"acc": 0.75}, probs=[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]],
              labels=[0, 0, 0, 1])
    curve = mt.mean_risk_coverage(mt.load_runs([root]), "test", np.array([0.25, 0.5, 0.75, 1.0]))["max_prob"]
    np.testing.assert_allclose(curve["risk"][0], [0, 0, 0, 0.25])
    assert curve["aurc"][0] == pytest.approx(0.0625)  # (0 + 0 + 0 + 1/4) / 4


def run_cli(*args, script="experiments/make_tables.py", env=None):
    import os

    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,bad,valid", [
    (["{sweep}", "--metrics", "acc,nosuch"], "nosuch", "ece"),
    (["{sweep}", "--split", "tst"], "tst", "test"),
    (["{sweep}", "--views", "methods,nosuch"], "nosuch", "errdet"),
    (["{sweep}", "--figures", "bars,pie"], "pie", "reliability"),
    (["{tmp}/nope"], "nope", "multirun folder"),
    (["{tmp}"], str("{tmp}"), "run directories"),
])
def test_bad_input_is_one_line(sweep, tmp_path, args, bad, valid):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(sweep=sweep, tmp=empty if a == "{tmp}" else tmp_path) for a in args]
    p = run_cli(*args, "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert bad.format(tmp=empty) in lines[0] and valid in lines[0]


def test_wandb_source_offline_is_a_clear_error():
    p = run_cli("--wandb", "me/uqlora", "--group", "laplace_lora", env={"WANDB_MODE": "offline"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: --wandb me/uqlora needs the W&B API, but WANDB_MODE=offline; unset it and log in (wandb login), "
        "or pass run directories instead"]
    p = run_cli("--wandb", "no-slash", env={"WANDB_MODE": "offline"})
    assert "not <entity>/<project>" in p.stderr and p.returncode == 2


def test_summarize_keeps_working(sweep, tmp_path):
    write_run(sweep, "30_map_d9_s0", data="d9", status="failed", error="boom")
    out = tmp_path / "summary.md"
    p = run_cli(str(sweep), "--out", str(out), script="experiments/summarize.py")
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert text.count("| map | m | d1 |") == 3 and "| laplace | m | d2 | 2 | 74.0% |" in text
    assert "failed: map / m / d9 / seed 0" in text and "boom" in p.stdout


def test_wandb_source_without_login_is_a_clear_error(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    p = subprocess.run([sys.executable, "experiments/make_tables.py", "--wandb", "me/uqlora"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)})
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: --wandb me/uqlora: cannot read runs from W&B") and "wandb login" in line


def test_sweep_that_never_started_a_job(tmp_path, capsys):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": {"seed": "0,1"}},
                                                                   "overrides": {"task": ["method=map"]}}}))
    runs = mt.load_runs([sweep])
    assert [r.status for r in runs] == ["not started", "not started"] and [r.seed for r in runs] == [0, 1]
    assert mt.main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no complete run among 2 found; not started: map / ? / ? / seed 0") and "\n" not in err


def test_nan_metric_leaves_the_cell_and_shows_in_n(tmp_path):
    root = tmp_path / "runs"
    for seed, au in enumerate([0.7, 0.8, float("nan")]):  # seed 2 made no error: AUROC undefined
        write_run(root, f"{seed}", seed=seed, metrics={"acc": 0.9, "auroc_misclf": au})
    (t,) = mt.build_tables(mt.load_runs([root]), "test", ["auroc_misclf"])
    c = t.cells[("map", "d1")]
    assert c.n == 2 and c.mean == pytest.approx(0.75)
    (a,) = mt.build_tables(mt.load_runs([root]), "test", ["acc"])
    assert a.cells[("map", "d1")].n == 3


def basic_sweep(root, params, task):
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
        "overrides": {"task": task}}}, sort_keys=False))
    return root


def test_rows_follow_the_sweep_order_with_the_baseline_first(tmp_path):
    # sweep A listed mc_dropout, laplace_ll, map (job numbers 0..2 of seed 0; seed 1 at 3..5)
    a = basic_sweep(tmp_path / "a", {"seed": "0,1", "method": "mc_dropout,laplace_ll,map"}, [])
    for job, (seed, method) in enumerate([(s, m) for s in (0, 1) for m in ("mc_dropout", "laplace_ll", "map")]):
        if (seed, method) == (0, "mc_dropout"):
            continue  # never started: its place in the sweep still counts (job 0)
        base = "laplace" if method == "laplace_ll" else method
        write_run(a, f"{job}_{method}_s{seed}", base, seed=seed, metrics={"acc": 0.5}, choice=method, job=job,
                  overrides=[f"seed={seed}", f"method={method}"], subset="last_layer" if base == "laplace" else None)
    # sweep B (given second) adds swag; runs outside any sweep: ual and ensemble, by label
    b = basic_sweep(tmp_path / "b", {"method": "swag,mc_dropout"}, [])
    write_run(b, "0_swag", "swag", metrics={"acc": 0.5}, choice="swag", job=0, overrides=["method=swag"])
    write_run(b, "1_mc_dropout", "mc_dropout", metrics={"acc": 0.5}, choice="mc_dropout", job=1,
              overrides=["method=mc_dropout"])
    loose = tmp_path / "loose"
    write_run(loose, "x", "ual", metrics={"acc": 0.5})
    write_run(loose, "y", "ensemble", metrics={"acc": 0.5})
    runs = mt.load_runs([b, loose, a])  # paths in this order: b's methods before a's
    assert {r.path.name: r.sweep for r in runs if r.status == "complete"}["0_swag"] == 0
    assert mt.method_order(runs) == ["map", "swag", "mc_dropout", "laplace_ll", "ensemble", "ual"]
    runs = mt.load_runs([a, b, loose])
    assert mt.method_order(runs) == ["map", "mc_dropout", "laplace_ll", "swag", "ensemble", "ual"]
    (t,) = mt.build_tables(runs, "test", ["acc"])
    assert t.rows == ["map", "mc_dropout", "laplace_ll", "swag", "ensemble", "ual"]
    names = [ln.split(" | ")[0].lstrip("| ") for ln in mt.to_markdown(t).splitlines()[4:]]
    assert names == ["MAP", "MC dropout", "LLLA", "SWAG", "Ensemble", "UAL"]
    assert [r.status for r in runs].count("not started") == 1


def test_display_names_come_from_the_run_config(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "0", "blob", metrics={"acc": 0.6}, display="BLoB")              # a method no table lists
    write_run(root, "1", "map", metrics={"acc": 0.5}, display="LoRA (MAP)")         # the config wins
    write_run(root, "2", "newthing", metrics={"acc": 0.4})                          # no name anywhere: the label
    write_run(root, "3", "map", data="d2", metrics={"acc": 0.5})                     # older run: legacy name
    write_run(root, "4", "laplace", metrics={"acc": 0.7}, display="Laplace-LoRA")
    runs = mt.load_runs([root])
    assert [r.display for r in runs] == ["BLoB", "LoRA (MAP)", "", "", "Laplace-LoRA"]
    assert mt.method_names(runs) == {"blob": "BLoB", "map": "LoRA (MAP)", "newthing": "newthing",
                                     "laplace": "Laplace-LoRA"}
    (t,) = mt.build_tables(runs, "test", ["acc"])
    md = mt.to_markdown(t)
    assert t.rows == ["map", "blob", "laplace", "newthing"]  # no sweep: the baseline first, then by label
    assert "| LoRA (MAP) | 50.0 | **50.0** |" in md and "| BLoB | 60.0 | – |" in md and "| newthing |" in md
    assert r"LoRA (MAP) & $50.0$ & $\mathbf{50.0}$ \\" in mt.to_latex(t)
    assert mt.display_name("laplace_ll") == "LLLA" and mt.display_name("swag_lora", "SWAG-LoRA") == "SWAG-LoRA"
    # two options printing alike (a laplace_ll run composed before its yaml named it) get their label added
    write_run(root, "5", "laplace", choice="laplace_ll", subset="last_layer", metrics={"acc": 0.8},
              display="Laplace-LoRA")
    names = mt.method_names(mt.load_runs([root]))
    assert names["laplace"] == "Laplace-LoRA (laplace)" and names["laplace_ll"] == "Laplace-LoRA (laplace_ll)"


@pytest.mark.parametrize("params,task", [
    ({"seed": "0,1,2", "method": "map,laplace_ll"}, ["experiment=x", "data=d1"]),
    ({"seed": "0,1,2", "data": "a,b", "method": "map,laplace"}, ["data=c", "seed=0,1", "+extra=1", "x.y=[1,2]"]),
    ({}, ["seed=range(3)", "method=map,'a b'", "lr=1e-3,2e-3", "model@backbone=tiny", "~foo"]),
    (None, ["method=map"]),
])
def test_expected_jobs_equal_the_basic_sweepers_product(tmp_path, params, task):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the oracle, in this test only
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = basic_sweep(tmp_path / "sw", params, task)
    args = [f"{k}={v}" for k, v in (params or {}).items()] + task
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    assert mt.expected_jobs(sweep) == [list(job) for job in batch]


def test_expected_jobs_refuse_what_the_basic_sweeper_cannot_expand(tmp_path):
    sweep = basic_sweep(tmp_path / "sw", {"lr": "interval(0.1, 1.0)"}, [])
    with pytest.raises(mt.TablesError, match=r"'lr=interval\(0.1, 1.0\)' is not a list or a range"):
        mt.expected_jobs(sweep)
    other = tmp_path / "optuna"
    other.mkdir()
    (other / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}}}))
    assert mt.expected_jobs(other) is None


def test_paired_differences_known_answer_and_id_alignment(tmp_path, capsys):
    """Each method minus MAP on the same examples: the differences equal direct numpy on the aligned examples
    (the other run lists them in reverse order), a copy of MAP is a tie with zero standard error, a much better
    predictor is 'better' on all three, and make tables writes paired.md."""
    from uqlora.metrics import ece
    from uqlora.results.paired import compare, paired_rows

    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 2, n)
    q = rng.dirichlet([1, 1], n)                            # MAP: noise
    good = np.where(np.arange(2)[None] == y[:, None], 0.9, 0.1)  # right with p 0.9 everywhere
    root = tmp_path / "runs"
    write_run(root, "0_map", "map", probs=q, labels=y, metrics={"acc": 0.5})
    write_run(root, "1_copy", "swag", probs=q, labels=y, metrics={"acc": 0.5})
    d = write_run(root, "2_good", "laplace", probs=good[::-1], labels=y[::-1], metrics={"acc": 0.9})
    np.savez(d / "predictions" / "test.npz", probs=good[::-1], labels=y[::-1], ids=np.arange(n)[::-1].astype(str))
    rows = {r["method"]: r for r in paired_rows(mt.load_runs([root]))}
    assert len(rows) == 2
    copy = next(r for r in rows.values() if r["acc"][0] == 0 and r["nll"][0] == 0)
    assert copy["ece"] == (0.0, 0.0) and copy["nll_verdict"] == copy["ece_verdict"] == copy["acc_verdict"] == "tie"
    best = next(r for r in rows.values() if r is not copy)
    nll = -np.log(good[np.arange(n), y]) + np.log(q[np.arange(n), y])
    assert best["nll"][0] == pytest.approx(nll.mean()) and best["nll"][1] == pytest.approx(nll.std(ddof=1) / np.sqrt(n))
    assert best["ece"][0] == pytest.approx(100 * (ece(good, y) - ece(q, y)))
    assert best["acc"][0] == pytest.approx(100 * (1 - np.mean(q.argmax(1) == y)))
    assert best["acc_verdict"] == best["nll_verdict"] == "better" and best["n"] == n
    worse = compare(q, good, y)  # the other way round
    assert worse["nll"][0] == pytest.approx(-nll.mean())
    assert mt.main([str(root), "--out", str(tmp_path / "t"), "--figures", "none"]) == 0
    md = (tmp_path / "t" / "paired.md").read_text()
    assert "minus MAP" in md and md.count("| m | d1 | 0 |") == 2


def test_cells_of_mixed_precision_are_named(tmp_path, capsys):
    """A run's precision is hardware.precision of its results.json, else its config's model.precision unless
    auto; a cell (model, data, seed) whose runs differ is named in tables.md and on stdout, its paired.md row says
    the two precisions, and the runs list has a precision column; a cell of one precision is not named."""
    from uqlora.results.paired import paired_rows

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    q = rng.dirichlet([1, 1], 50)
    root = tmp_path / "runs"
    for seed in (0, 1):
        d = write_run(root, f"0_map_s{seed}", "map", seed=seed, probs=q, labels=y, metrics={"acc": 0.5})
        res = json.loads((d / "results.json").read_text())
        res["config"]["model"]["precision"] = "bf16-mixed"          # a run from before model.precision=auto
        (d / "results.json").write_text(json.dumps(res))
    write_run(root, "1_blob_s0", "blob", seed=0, probs=q, labels=y, metrics={"acc": 0.5},
              extra={"hardware": {"precision": "32-true", "cpu_native_bf16": False}})
    write_run(root, "1_blob_s1", "blob", seed=1, probs=q, labels=y, metrics={"acc": 0.5},
              extra={"hardware": {"precision": "bf16-mixed"}})
    runs = mt.load_runs([root])
    assert {(r.method, r.seed): r.precision for r in runs} == {
        ("map", 0): "bf16-mixed", ("map", 1): "bf16-mixed", ("blob", 0): "32-true", ("blob", 1): "bf16-mixed"}
    lines = mt.precision_lines(runs)
    assert lines == ["mixed precision in m / d1 / seed 0: 32-true: blob; bf16-mixed: map"]
    rows = {(r["seed"], r["method"]) for r in paired_rows(runs)}
    assert rows == {(0, "blob (32-true; MAP bf16-mixed)"), (1, "blob")}
    assert mt.main([str(root), "--out", str(tmp_path / "t"), "--figures", "none"]) == 0
    assert lines[0] in capsys.readouterr().out
    md = (tmp_path / "t" / "tables.md").read_text()
    assert "## Cells of mixed precision" in md and lines[0] in md and "seed 1:" not in md
    assert "| time (s) | precision |" in md and md.count("| 32-true |") == 1
    assert "blob (32-true; MAP bf16-mixed)" in (tmp_path / "t" / "paired.md").read_text()


def test_errdet_paired_differences_known_answer(tmp_path):
    """An AdUE run's saved scores, each against the softmax response on the same predictions: a score that ranks
    every error above every correct prediction is 'better' by 1 - AUROC(SR) with a bootstrap standard error, SR's
    own copy is a zero tie, a score that ranks them the wrong way round is 'worse'; make tables writes the section
    into paired.md (no MAP run needed)."""
    from uqlora.metrics.selective import misclassification_auroc
    from uqlora.results.paired import errdet_compare, errdet_rows

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    p1 = rng.uniform(0.5, 1.0, n)
    pred = np.where(rng.uniform(size=n) < p1, y, 1 - y)       # right with probability max p
    probs = np.where(np.arange(2)[None] == pred[:, None], p1[:, None], 1 - p1[:, None])
    correct = pred == y
    sr = (1 - p1) / 0.5
    root = tmp_path / "runs"
    d = write_run(root, "0_adue", "adue", probs=probs, labels=y, metrics={"acc": float(correct.mean())})
    np.savez(d / "predictions" / "test.npz", probs=probs, labels=y, ids=np.arange(n).astype(str), u_sr=sr,
             u_entropy=sr.copy(), u_adue=(~correct).astype(float) + 0.01 * sr, u_mahalanobis=correct.astype(float))
    rows = {r["score"]: r for r in errdet_rows(mt.load_runs([root]))}
    assert set(rows) == {"entropy", "adue", "mahalanobis"}
    assert rows["entropy"]["d_auroc"] == (0.0, 0.0) and rows["entropy"]["verdict"] == "tie"
    base = misclassification_auroc(-sr, correct)
    assert 0.55 < base < 0.9
    d_adue, se = rows["adue"]["d_auroc"]
    assert d_adue == pytest.approx(1.0 - base) and 0 < se < d_adue / 2 and rows["adue"]["verdict"] == "better"
    assert rows["mahalanobis"]["d_auroc"][0] == pytest.approx(0.0 - base) and rows["mahalanobis"]["verdict"] == "worse"
    assert rows["adue"]["errors"] == int((~correct).sum()) and rows["adue"]["n"] == n
    assert errdet_compare(sr, sr, correct)[0] == 0.0
    assert mt.main([str(root), "--out", str(tmp_path / "t"), "--figures", "none"]) == 0
    md = (tmp_path / "t" / "paired.md").read_text()
    assert "minus SR" in md and "minus MAP" not in md and md.count("| m | d1 | 0 | AdUE |") == 3
