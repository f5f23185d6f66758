"""The paper-style experiment suites (conf/experiment/*.yaml): every swept value composes into a valid config
with the papers' hyper-parameters; a real multirun of one suite (tiny random model) goes through
experiments/make_tables.py (uqlora.results) and notebooks/paper_tables.ipynb to tables, figures and a list of
the runs that failed or never started; W&B runs are grouped by experiment and curves are logged as native W&B
plots."""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from uqlora import results

SUITES = {  # experiment -> number of jobs of its sweep
    "laplace_lora": 144, "laplace_lora_cpu": 90, "swag_lora": 60, "swag_lora_cpu": 45, "adue": 60, "adue_cpu": 30,
    "ual_sft_cpu": 9, "bayes_lora_cpu": 12,
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


OPTION_NAMES = {"laplace_ll": "laplace", "swag_lora": "swag", "multiswag_lora": "multiswag",  # option -> method.name
                "tfb_official": "tfb", "ual_category": "ual"}

def sweep_params(exp):
    from hydra import compose as hcompose, initialize_config_dir
    from uqlora.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=[f"experiment={exp}"], return_hydra_config=True)
        assert re.fullmatch(rf"multirun/{exp}/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{{6}}", cfg.hydra.sweep.dir)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def covering_jobs(params):
    """Every value of every swept axis at least once (the others at their first value)."""
    first = {k: v[0] for k, v in params.items()}
    jobs = [dict(first)]
    for k, values in params.items():
        jobs += [{**first, k: v} for v in values[1:]]
    return jobs


@pytest.mark.parametrize("exp", sorted(SUITES))
def test_every_swept_value_composes(exp):
    from hydra import compose as hcompose, initialize_config_dir

    from uqlora.methods import get_method

    params = sweep_params(exp)
    assert set(params) >= {"seed"} and params["seed"] == ["0", "1", "2"]
    assert len(list(itertools.product(*params.values()))) == SUITES[exp]
    axes = {k: v for k, v in params.items() if k != "seed"}  # the seed changes no composition
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in covering_jobs(axes):
            cfg = hcompose(config_name="config", overrides=[f"experiment={exp}", *(f"{k}={v}" for k, v in job.items())])
            container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            assert container["experiment_name"] == exp
            get_method(cfg.method.name)  # a registered method class
            for key in ("method", "data", "model"):
                if key in job:
                    assert cfg[key].name == OPTION_NAMES.get(job[key], job[key])


def test_laplace_lora_paper_settings():
    cfg = compose(["experiment=laplace_lora", "method=laplace", "data=obqa"])
    assert cfg.model.name == "llama2_7b" and cfg.model.head == "lm_choices"
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 16, 0.1)
    assert list(cfg.model.lora.target_modules) == ["q_proj", "v_proj"] and cfg.model.lora.train_head
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio) == (5e-5, 0.0, 0.0)
    assert (cfg.data.batch_size, cfg.data.max_length, cfg.data.max_train_samples) == (4, 300, None)
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val, cfg.train.restore_best) == (10000, 0.5, False)
    assert cfg.trainer.accelerator == "gpu" and cfg.method.prior.method == "val_nll"  # the repository default
    paper = compose(["experiment=laplace_lora", "method=laplace", "method.prior.method=marglik"])  # the paper's prior
    assert paper.method.prior.method == "marglik"
    ll = compose(["experiment=laplace_lora", "method=laplace_ll"]).method
    assert ll.name == "laplace" and ll.subset == "last_layer"
    cpu = compose(["experiment=laplace_lora_cpu", "method=laplace_ll", "data=arc_c"])
    assert cpu.model.name == "smollm2_135m" and cpu.data.max_train_samples == 400 and cpu.data.max_test_samples == 500
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.max_epochs == 5 and cpu.model.cloze_scale == "learned"
    assert cpu.train.reuse_map and not cpu.train.restore_best  # post-hoc methods on the cell's MAP run; fixed budget


def test_swag_lora_and_adue_settings():
    cfg = compose(["experiment=swag_lora", "method=swag_lora", "data=cqa"])
    assert (cfg.method.name, cfg.method.unit, cfg.method.start, cfg.method.collect_every) == ("swag", "epoch", 8, 1)
    assert (cfg.method.anneal, cfg.method.lr, cfg.method.max_rank, cfg.method.num_samples) == (5, 1e-4, 5, 15)
    assert cfg.trainer.max_epochs == 13 and cfg.data.ood == "mmlu" and cfg.optim.lr == 6e-4
    ms = compose(["experiment=swag_lora", "method=multiswag_lora"]).method
    assert ms.name == "multiswag" and ms.num_models == 5 and ms.unit == "epoch"
    for model in ("roberta_base", "qwen25_7b"):
        cfg = compose(["experiment=adue", f"model={model}", "data=tweeteval_hate"])
        assert cfg.method.name == "adue" and cfg.model.head == "classifier"
    assert compose(["experiment=adue_cpu", "model=smollm2_135m"]).model.head == "classifier"


def test_method_options_pass_the_command_line_check():
    from uqlora.cli import check_overrides
    from uqlora.errors import UqloraError

    check_overrides(["method=laplace_ll", "method.prior.steps=100", "method.subset=last_layer"])
    check_overrides(["-m", "method=laplace_ll,laplace", "seed=0,1"])
    # Hydra's multirun composes the non-swept overrides with the swept group's default (map) first, where
    # method.prior does not exist: refused in one line instead of Hydra's multi-line error
    with pytest.raises(UqloraError, match="with -m, Hydra first composes .*'prior' not in 'MapConfig'"):
        check_overrides(["-m", "method=laplace_ll,laplace", "method.prior.steps=100"])
    check_overrides(["method=swag_lora", "method.anneal=3"])
    with pytest.raises(UqloraError, match="unknown key 'method.nosuch' for method=laplace_ll; valid keys of method: .*subset"):
        check_overrides(["method=laplace_ll", "method.nosuch=1"])


# ------------------------------------------------------------------------------- a real multirun, end to end
TINY = ["model=tiny_llama", "debug=fast", "trainer.max_steps=2", "data.max_test_samples=16", "data.max_val_samples=8",
        "progress_bar=none", "print_table=false"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """`python train.py -m experiment=laplace_lora_cpu` cut to 2 seeds x SST-2 x (MAP, LLLA) on a tiny random
    Llama (the suite's sweeper with command-line values; ~30 s)."""
    sweep = tmp_path_factory.mktemp("multirun") / "laplace_lora_cpu"
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=laplace_lora_cpu", *TINY, "seed=0,1", "data=sst2",
                        "method=map,laplace_ll", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return sweep


def test_multirun_run_dirs_name_the_method_option(tiny_sweep):
    names = sorted(d.name for d in tiny_sweep.iterdir() if d.is_dir())
    assert names == ["0_map_tiny_llama_sst2_s0", "1_laplace_ll_tiny_llama_sst2_s0",
                     "2_map_tiny_llama_sst2_s1", "3_laplace_ll_tiny_llama_sst2_s1"]
    res = json.loads((tiny_sweep / "1_laplace_ll_tiny_llama_sst2_s0" / "results.json").read_text())
    assert res["method"] == "laplace" and res["config"]["method"]["subset"] == "last_layer"
    assert res["config"]["experiment_name"] == "laplace_lora_cpu"
    # train.reuse_map (the suite's setting): LLLA starts from its own seed's MAP run of the sweep, untrained
    for llla, map_dir in (("1_laplace_ll_tiny_llama_sst2_s0", "0_map_tiny_llama_sst2_s0"),
                          ("3_laplace_ll_tiny_llama_sst2_s1", "2_map_tiny_llama_sst2_s1")):
        res = json.loads((tiny_sweep / llla / "results.json").read_text())
        assert res["train"]["map_run"] == str((tiny_sweep / map_dir).resolve()) and "steps" not in res["train"]
        assert res["config"]["method"]["map_run"] == res["train"]["map_run"] and "fit" not in res["timings"]


def test_reuse_map_makes_the_map_and_swag_runs_member_0_of_the_ensemble_and_multiswag(tmp_path):
    """train.reuse_map: an ensemble's member 0 is the sweep's MAP run (same seed -> same training), MultiSWAG's the
    SWAG run with the same SWAG settings -- loaded, not trained, with the same predictions as training them."""
    import numpy as np

    tiny = [*TINY[:2], "trainer.max_steps=4", *TINY[3:], "experiment=laplace_lora_cpu", "data=sst2", "method.num_models=2"]

    def run(where, method, *extra):
        p = subprocess.run([sys.executable, "train.py", *tiny, f"method={method}", *extra, f"hydra.run.dir={where}"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((where / "results.json").read_text()), np.load(where / "predictions" / "test.npz")["probs"]

    swag = ["method.collect_every=1", "method.max_rank=2"]
    subprocess.run([sys.executable, "train.py", *[t for t in tiny if "num_models" not in t], "method=map",
                    f"hydra.run.dir={tmp_path / 'sweep' / 'map'}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    subprocess.run([sys.executable, "train.py", *[t for t in tiny if "num_models" not in t], "method=swag", *swag,
                    f"hydra.run.dir={tmp_path / 'sweep' / 'swag'}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    for method, single, extra in (("ensemble", "map", []), ("multiswag", "swag", swag)):
        res, probs = run(tmp_path / "sweep" / method, method, *extra)
        assert res["train"][0]["reused_run"] == str((tmp_path / "sweep" / single).resolve())
        assert "steps" not in res["train"][0] and res["train"][1]["steps"] == 4  # member 1 is trained
        ref, ref_probs = run(tmp_path / "alone" / method, method, *extra, "train.reuse_map=false")
        assert all("reused_run" not in m for m in ref["train"])
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    other, _ = run(tmp_path / "sweep" / "multiswag_k3", "multiswag", *swag[:1], "method.max_rank=3")
    assert all("reused_run" not in m for m in other["train"])  # another SWAG setting: member 0 is trained


def test_reuse_map_finds_exactly_one_map_run_of_the_cell(tmp_path):
    """train.reuse_map: the MAP run of the same seed / data / splits in the sweep folder; none or two: one line."""
    from uqlora.errors import UqloraError
    from uqlora.sources import SAME_SPLITS, sweep_map_run

    cfg = compose(["experiment=laplace_lora_cpu", "method=laplace", "data=sst2", "seed=1"])

    def run(name, method, seed, data="sst2", n=cfg.data.max_train_samples):
        d = tmp_path / name
        d.mkdir()
        splits = {**{k: cfg.data.get(k) for k in SAME_SPLITS}, "name": data, "max_train_samples": n}
        rcfg = {"seed": seed, "model": {"name": "smollm2_135m"}, "data": splits}
        (d / "results.json").write_text(json.dumps({"status": "complete", "method": method, "metrics": {}, "config": rcfg}))

    with pytest.raises(UqloraError, match=r"no finished MAP run of model=smollm2_135m data=sst2 seed=1 in .*; valid: a sweep"):
        sweep_map_run(cfg.copy(), tmp_path / "me")
    run("0_map_s0", "map", 0)
    run("1_laplace_s1", "laplace", 1)
    run("2_map_s1_arc", "map", 1, data="arc_e")
    run("3_map_s1_other_size", "map", 1, n=64)
    run("4_map_s1", "map", 1)
    got = cfg.copy()
    assert sweep_map_run(got, tmp_path / "me") == str(tmp_path / "4_map_s1") == got.method.map_run
    run("5_map_s1_again", "map", 1)
    with pytest.raises(UqloraError, match="2 finished MAP runs of .* \\(4_map_s1, 5_map_s1_again\\); valid: method.map_run="):
        sweep_map_run(cfg.copy(), tmp_path / "me")
    given = compose(["experiment=laplace_lora_cpu", "method=laplace", "method.map_run=/x"])
    assert sweep_map_run(given, tmp_path / "me") is None and given.method.map_run == "/x"  # an explicit source wins
    assert sweep_map_run(compose(["experiment=laplace_lora_cpu", "method=map"]), tmp_path / "me") is None
    assert sweep_map_run(compose(["method=laplace"]), tmp_path / "me") is None  # off by default


def test_expected_jobs_are_the_jobs_the_sweep_launched(tiny_sweep):
    """The suite's sweeper params (seed, data, method) overridden from the command line, expanded as Hydra's
    basic sweeper launched them: job i's overrides.yaml is the i-th expected job."""
    from uqlora.rundir import RunDir

    dirs = sorted((RunDir(d) for d in tiny_sweep.iterdir() if RunDir(d).is_run()), key=RunDir.job_num)
    assert [d.job_num() for d in dirs] == [0, 1, 2, 3]
    jobs = results.expected_jobs(tiny_sweep)
    assert jobs == [d.overrides() for d in dirs]
    assert jobs[1][:4] == ["seed=0", "data=sst2", "method=laplace_ll", "experiment=laplace_lora_cpu"]
    assert results.not_started(tiny_sweep, [d.path for d in dirs]) == []


@pytest.fixture(scope="module")
def damaged_sweep(tiny_sweep, tmp_path_factory):
    """The sweep with one run failed, one results.json truncated and one job never started."""
    sweep = tmp_path_factory.mktemp("damaged") / "sweep"
    shutil.copytree(tiny_sweep, sweep)
    res = sweep / "2_map_tiny_llama_sst2_s1" / "results.json"
    data = json.loads(res.read_text())
    res.write_text(json.dumps({**{k: data[k] for k in ("method", "model", "data", "seed", "config")},
                               "status": "failed", "error": "RuntimeError: CUDA out of memory"}))
    trunc = sweep / "1_laplace_ll_tiny_llama_sst2_s0" / "results.json"
    trunc.write_text(trunc.read_text()[:100])
    shutil.rmtree(sweep / "3_laplace_ll_tiny_llama_sst2_s1")
    return sweep


def test_make_tables_on_the_multirun(tiny_sweep, damaged_sweep, tmp_path):
    out = tmp_path / "tables"
    assert results.main([str(tiny_sweep), "--out", str(out)]) == 0
    md = (out / "tables.md").read_text()
    acc = md.split("### ACC")[1].split("###")[0]
    assert "| MAP |" in acc and "| LLLA |" in acc and "SST-2" in acc and "(n=" not in acc  # 2 seeds everywhere
    assert acc.index("| MAP |") < acc.index("| LLLA |")  # the sweep's order
    assert "## Missing / failed runs\n\nnone" in md
    for stem in ("reliability_tiny_llama_sst2_test", "risk_coverage_tiny_llama_sst2_test", "bars_tiny_llama"):
        assert (out / "figures" / f"{stem}.pdf").stat().st_size > 1000
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
    assert r"\begin{tabular}{lc}" in (out / "tables.tex").read_text()

    out2 = tmp_path / "tables2"
    p = subprocess.run([sys.executable, "experiments/make_tables.py", str(damaged_sweep), "--out", str(out2),
                        "--strict"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr  # --strict: incomplete runs
    md = (out2 / "tables.md").read_text()
    expected = ["failed: map / tiny_llama / sst2 / seed 1", "CUDA out of memory",
                "unreadable: laplace_ll / tiny_llama / sst2 / seed 0", "truncated or not JSON",
                "not started: laplace_ll / tiny_llama / sst2 / seed 1", "seed=1", "method=laplace_ll"]
    for text in expected:
        assert text in md and text in p.stdout, text
    acc = md.split("### ACC")[1].split("###")[0]
    map_s0 = json.loads((damaged_sweep / "0_map_tiny_llama_sst2_s0" / "results.json").read_text())
    assert f"| MAP | **{100 * map_s0['metrics']['test']['acc']:.1f}** |" in acc  # one seed left: no std
    assert "| LLLA |" not in acc  # no complete LLLA run is left


def test_notebook_reproduces_the_tables(tiny_sweep, tmp_path):
    import ipykernel  # noqa: F401  (the test extra installs nbformat, nbclient, ipykernel: CI runs the notebook)
    import nbclient
    import nbformat
    out = tmp_path / "nb"
    nb = nbformat.read(ROOT / "notebooks" / "paper_tables.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in ("UQLORA_RUNS", "UQLORA_TABLES_OUT")}
    os.environ.update({"UQLORA_RUNS": str(tiny_sweep), "UQLORA_TABLES_OUT": str(out)})
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "4 complete runs, 0 missing / failed, 0 duplicates" in text
    # the notebook's tables are the script's tables
    script_out = tmp_path / "script"
    assert results.main([str(tiny_sweep), "--out", str(script_out), "--figures", "none"]) == 0
    tables = lambda md: md.split("## Missing")[0]  # noqa: E731
    assert tables((out / "tables.md").read_text()) == tables((script_out / "tables.md").read_text())
    assert (out / "figures" / "reliability_tiny_llama_sst2_test.png").is_file()


# ------------------------------------------------------------------------------------------------------ W&B
def wandb_cfg(*overrides):
    return compose(["logger=wandb", *overrides])


def test_wandb_group_is_the_experiment(tmp_path):
    from uqlora.logging_utils import build_logger

    lg = build_logger(wandb_cfg("experiment=laplace_lora_cpu", "method=laplace_ll"), tmp_path)
    init = lg._wandb_init
    assert init["group"] == "laplace_lora_cpu"
    assert {"method:laplace", "data:sst2", "model:smollm2_135m", "seed:0", "experiment:laplace_lora_cpu"} <= set(init["tags"])
    assert build_logger(wandb_cfg(), tmp_path)._wandb_init["group"] == "sst2-minilm"  # no experiment
    assert build_logger(wandb_cfg("experiment=adue_cpu", "logger.group=mine"), tmp_path)._wandb_init["group"] == "mine"


def test_curves_are_logged_as_native_wandb_line_plots(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from uqlora.logging_utils import log_results_table, log_table

    class Run:  # records what would be sent to W&B
        def __init__(self):
            self.logged = []

        def log(self, payload):
            self.logged.append(payload)

    run = Run()
    lg = WandbLogger(experiment=run)
    log_table(lg, "test/risk_coverage_curve", ["score", "coverage", "risk"],
              [["max_prob", 0.5, 0.1], ["max_prob", 1.0, 0.2], ["neg_entropy", 1.0, 0.2]])
    log_table(lg, "test/calibration_table", ["bin_lo", "bin_hi", "confidence", "accuracy", "count"],
              [[0.0, 0.5, 0.4, 0.3, 3], [0.5, 1.0, float("nan"), float("nan"), 0]])
    log_results_table(lg, {"method": "map", "model": "m", "data": "d", "seed": 0,
                           "metrics": {"test": {"acc": 0.8, "ece": 0.1}}})
    rc, cal, res = run.logged
    spec = rc["test/risk_coverage_curve_plot"].spec
    assert spec.spec_name == "wandb/line/v0" and spec.fields == {"x": "coverage", "y": "risk", "stroke": "score"}
    assert rc["test/risk_coverage_curve"].data[0] == ["max_prob", 0.5, 0.1]
    plot = cal["test/calibration_table_plot"]
    assert plot.spec.fields == {"x": "confidence", "y": "accuracy", "stroke": None}
    assert plot.table.data == [[0.0, 0.5, 0.4, 0.3, 3]]  # the empty bin is not drawn
    assert set(res) == {"results"} and res["results"].columns == ["method", "model", "data", "seed", "split", "acc", "ece"]
    assert res["results"].data == [["map", "m", "d", 0, "test", 0.8, 0.1]]


def test_gpu_suite_and_model_configs_carry_the_official_settings():
    blob = compose(["experiment=laplace_lora", "method=blob", "data=arc_e"])
    m = blob.method
    assert (m.eps, m.beta, m.kllr, m.gamma, m.train_samples, m.num_samples, m.rho_update) == (
        0.05, 0.2, 0.01, 8.0, 1, 10, "sgd")
    assert blob.model.name == "llama2_7b" and blob.optim.lr == 5e-5  # the suite's shared protocol
    t = compose(["experiment=laplace_lora", "method=tfb_official"]).method
    assert (t.name, t.low, t.high, t.tolerance, t.search_iters, t.anchor_size, t.num_samples, t.labels) == (
        "tfb", 0.001, 0.015, 0.003, 5, 500, 10, "pseudo")
    s = compose(["experiment=laplace_lora", "method=scalabl"]).method
    assert (s.eps, s.kllr, s.prior_std, s.gamma, s.num_samples) == (0.05, 0.2, 1.0, 8.0, 10)
    for model, hub in (("llama31_8b", "meta-llama/Llama-3.1-8B"), ("qwen3_8b", "Qwen/Qwen3-8B")):
        cfg = compose([f"model={model}", "data=arc_e", "method=blob"])
        assert (cfg.model.hub_id, cfg.model.kind, cfg.model.source, cfg.model.dtype) == (hub, "causal", "hub", "bf16")
