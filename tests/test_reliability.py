"""Reliability (issue 9): a run killed with SIGKILL resumes to the same final numbers (also in the SWAG phase
and in a Laplace fit); sweeps record a failing member and finish the others, and a re-run skips finished
members; NaN losses, singular / ill-conditioned Laplace factors and short SWAG phases are handled; the same
seed reproduces bit-identical metrics; bad inputs fail in one line; nothing unsafe is loaded or logged."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from conftest import ROOT, compose
from test_cli import error_line
from uqlora.errors import UqloraError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
QUIET = ["logger=none", "progress_bar=none", "print_table=false"]
# tiny BERT (dropout on: the resumed run must redraw the same masks), 4 epochs of 20 steps, a checkpoint per epoch
RUN = ["model=tiny_bert", "debug=fast", "trainer.max_steps=-1", "trainer.max_epochs=4", "data.max_train_samples=160",
       "data.max_test_samples=48", *QUIET]


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _kill_when(args, ready, timeout=240) -> subprocess.Popen:
    """Start train.py, SIGKILL it as soon as ``ready()`` holds; fail if it finished first."""
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            try:
                if ready():
                    p.send_signal(signal.SIGKILL)
                    p.wait(30)
                    return p
            except Exception:  # a checkpoint being written: look again
                pass
            if p.poll() is not None:
                pytest.fail(f"train.py ended (rc={p.returncode}) before it could be killed: {p.stderr.read()[-2000:]}")
            time.sleep(0.02)
        pytest.fail("the kill condition never held")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ckpt_epoch(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["epoch"]) if path.is_file() else -1


def _same_metrics(a: dict, b: dict):
    assert a["metrics"].keys() == b["metrics"].keys()
    for split in a["metrics"]:
        assert a["metrics"][split] == b["metrics"][split], split  # exact: CPU is deterministic


def _same_predictions(a: Path, b: Path):
    for f in sorted((a / "predictions").glob("*.npz")):
        x, y = np.load(f), np.load(b / "predictions" / f.name)
        for k in x.files:
            assert np.array_equal(x[k], y[k]), (f.name, k)


# --- resume after SIGKILL ---------------------------------------------------------------------------------
def test_sigkill_during_training_then_resume_gives_identical_metrics(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _train(*RUN, f"hydra.run.dir={full}")
    assert p.returncode == 0, p.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    _kill_when([*RUN, f"hydra.run.dir={killed}"], lambda: _ckpt_epoch(last) >= 0)
    assert not (killed / "results.json").exists()
    epoch_at_kill = _ckpt_epoch(last)
    assert 0 <= epoch_at_kill < 3  # killed mid-training

    again = _train(*RUN, f"hydra.run.dir={killed}")  # no resume flag: the unfinished run is not overwritten
    assert again.returncode == 1 and "resume=true" in again.stderr
    assert _ckpt_epoch(last) == epoch_at_kill and not (killed / "results.json").exists()

    p = _train(f"resume={killed}")  # the run's own overrides are reused
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _results(full), _results(killed)
    assert b["train"]["resumed_from"] == str(last)
    assert b["train"]["steps"] == a["train"]["steps"] == 80
    assert b["train"]["best_step"] == a["train"]["best_step"]
    _same_metrics(a, b)
    _same_predictions(full, killed)


SWAG = ["method=swag", "method.unit=epoch", "method.start=1", "method.collect_every=1", "method.num_samples=4"]


def test_sigkill_in_the_swag_phase_then_resume_gives_identical_moments(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _train(*RUN, *SWAG, f"hydra.run.dir={full}")
    assert p.returncode == 0, p.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"

    def in_swag_phase():
        ck = torch.load(last, weights_only=True, map_location="cpu")
        return int(ck["callbacks"]["SWAGCallback"]["swag"]["n"]) >= 1

    _kill_when([*RUN, *SWAG, f"hydra.run.dir={killed}"], in_swag_phase)
    assert not (killed / "checkpoints" / "method_state.pt").exists()
    n_at_kill = int(torch.load(last, weights_only=True)["callbacks"]["SWAGCallback"]["swag"]["n"])
    assert 1 <= n_at_kill < 3
    p = _train(*RUN, *SWAG, f"hydra.run.dir={killed}", "resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(full / "checkpoints" / "method_state.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "method_state.pt", weights_only=True)
    assert int(a["n"]) == int(b["n"]) == 3
    for k in ("mean", "sq_mean", "dev"):
        assert torch.equal(a[k], b[k]), k
    _same_metrics(_results(full), _results(killed))


LAPLACE = ["method=laplace", "data.max_train_samples=1200", "trainer.max_epochs=1", "trainer.max_steps=3",
           "method.prior.method=marglik"]


def test_sigkill_during_the_laplace_fit_then_resume_gives_identical_posterior(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _train(*RUN, *LAPLACE, f"hydra.run.dir={full}")
    assert p.returncode == 0, p.stderr[-3000:]
    ck = killed / "checkpoints"
    _kill_when([*RUN, *LAPLACE, f"hydra.run.dir={killed}"], lambda: (ck / "adapter.pt").is_file())
    # training done, the KFAC fit over 1200 examples under way: no posterior written yet
    assert (ck / "last.ckpt").is_file() and not (ck / "method_state.pt").exists()
    p = _train(f"resume={killed}")
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(full / "checkpoints" / "method_state.pt", weights_only=True)
    b = torch.load(ck / "method_state.pt", weights_only=True)
    assert a.keys() == b.keys() and a["posterior"].keys() == b["posterior"].keys()
    ta, tb = list(_tensors(a["posterior"])), list(_tensors(b["posterior"]))
    assert len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert a["tuning"] == b["tuning"]
    _same_metrics(_results(full), _results(killed))


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            yield from _tensors(state[k])
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


# --- sweeps -----------------------------------------------------------------------------------------------
def test_sweep_with_a_poisoned_member_records_it_and_a_rerun_skips_finished_members(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=tiny_bert", "debug=fast", "trainer.max_steps=4", "data.max_test_samples=16",
            "logger.kind=wandb", "progress_bar=none", "print_table=false", "optim.lr=1e30,1e-3",
            f"hydra.sweep.dir={sweep}"]
    p = _train(*args, timeout=600)
    assert p.returncode == 1  # a member failed: the sweep says so ...
    bad, good = members = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [_results(d)["status"] for d in members] == ["failed", "complete"]  # ... and the next one still ran
    err = _results(bad)["error"]
    assert "training loss is nan" in err and "optim.lr" in err and (bad / "error.log").read_text().strip()
    assert f"failed: {bad}" in p.stderr and "1 complete, 1 failed" in p.stdout
    for d in members:  # one W&B run per member (the members share a process): never a run reused across members
        runs = list(d.glob("wandb/offline-run-*"))
        assert len(runs) == 1 and runs[0].name.endswith((d / "wandb_run_id").read_text().strip())
    assert len({(d / "wandb_run_id").read_text() for d in members}) == 2
    mtime = (good / "results.json").stat().st_mtime_ns

    changed = _train(*args, "trainer.max_steps=5", timeout=600)  # same folder, another config: refused, untouched
    assert changed.returncode == 1 and f"refused: {good}" in changed.stderr and "max_steps" in changed.stderr
    assert (good / "results.json").stat().st_mtime_ns == mtime
    assert "trainer.max_steps=4" in (good / ".hydra" / "overrides.yaml").read_text()  # its own config kept
    assert not list(sweep.glob("*/.refused"))

    p = _train(*args, timeout=600)  # the same sweep again: the finished member is skipped, the failed one reruns
    assert p.returncode == 1 and p.stdout.count("skipped (complete results)") == 1
    assert (good / "results.json").stat().st_mtime_ns == mtime and _results(bad)["status"] == "failed"

    p = _train(*args, "skip_complete=false", timeout=600)  # opt-out: every member reruns ...
    assert p.returncode == 1 and "skipped" not in p.stdout
    kept = list(good.glob("previous/*/results.json"))  # ... and the earlier run's files are kept, not overwritten
    assert len(kept) == 1 and kept[0].stat().st_mtime_ns == mtime
    assert (kept[0].parent / "checkpoints" / "adapter.pt").is_file() and list(bad.glob("previous/*/error.log"))
    assert _results(good)["status"] == "complete" and _results(good)["metrics"] == json.loads(kept[0].read_text())["metrics"]


def test_a_truncated_results_file_is_not_a_result(tmp_path):
    from uqlora.runs import read_results

    d = tmp_path / "run"
    p = _train("model=tiny_bert", "debug=fast", "trainer.max_steps=4", "data.max_test_samples=16", *QUIET,
               f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    full = (d / "results.json").read_text()
    (d / "results.json").write_text(full[: len(full) // 2])  # a writer killed mid-file (what atomic writes prevent)
    assert read_results(d) is None
    p = _train("model=tiny_bert", "debug=fast", "trainer.max_steps=4", "data.max_test_samples=16", *QUIET,
               f"hydra.run.dir={d}")  # not skipped as complete, and the checkpoint is not trained over
    assert p.returncode == 1 and "holds an unfinished run" in p.stderr
    p = _train(f"resume={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((d / "results.json").read_text())["metrics"] == json.loads(full)["metrics"]


def test_atomic_write_leaves_the_old_file_when_the_writer_dies(tmp_path):
    from uqlora.io import atomic_json, atomic_write

    path = tmp_path / "results.json"
    atomic_json({"status": "complete", "metrics": {"test": {"acc": 0.5}}}, path)

    def dies(f):
        f.write(b'{"status": "compl')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert json.loads(path.read_text())["metrics"]["test"]["acc"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_two_runs_never_share_a_directory():
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf

    from uqlora.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = [hcompose(config_name="config", return_hydra_config=True) for _ in range(2)]
    raw = OmegaConf.to_container(cfgs[0].hydra, resolve=False)
    assert "${uid:}" in raw["run"]["dir"] and "${uid:}" in raw["sweep"]["dir"]
    assert "${hydra.job.num}" in raw["sweep"]["subdir"]
    uids = [OmegaConf.create({"d": "${uid:}"}).d for _ in range(50)]
    assert len(set(uids)) == 50 and all(len(u) == 6 for u in uids)  # same second, same job: still distinct


# --- numerical faults -------------------------------------------------------------------------------------
def _cfg(tmp_path, name, *overrides):
    cfg = compose(["debug=fast", *QUIET, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / name)
    return cfg


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_the_run_in_one_line_and_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    from uqlora.methods.base import UQMethod
    from uqlora.tasks import train

    orig = UQMethod.loss
    seen = {}

    def poisoned(self, logits, batch):
        loss = orig(self, logits, batch)
        if self.global_step == 25:  # epoch 2 (20 steps per epoch), after a validation and a checkpoint
            ck = Path(self.trainer.default_root_dir) / "checkpoints"
            seen.update(best=_sha(ck / "best_adapter.pt"), last=_sha(ck / "last.ckpt"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(UQMethod, "loss", poisoned)
    cfg = _cfg(tmp_path, "run", "model=tiny_bert", "trainer.max_steps=-1", "trainer.max_epochs=3",
               "data.max_train_samples=160")
    with pytest.raises(UqloraError, match=r"training loss is nan at step 25 .*optim.lr"):
        train(cfg)
    ck = tmp_path / "run" / "checkpoints"
    assert _sha(ck / "best_adapter.pt") == seen["best"] and _sha(ck / "last.ckpt") == seen["last"]
    state = torch.load(ck / "best_adapter.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    res = _results(tmp_path / "run")
    assert res["status"] == "failed" and "nan" in res["error"] and "\n" not in res["error"]
    assert not (ck / "adapter.pt").exists()


def test_eigh_failure_falls_back_to_jitter_with_a_warning(monkeypatch):
    from uqlora.core import kfac

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    mat = x @ x.T  # rank 3 of 6: singular
    lam, Q = kfac.stable_eigh(mat)  # singular needs no jitter
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, mat, atol=1e-10, rtol=0)

    real, calls = torch.linalg.eigh, []

    def flaky(m, *a, **k):  # the solver fails on the factor itself (as LAPACK can on ill-conditioned input)
        calls.append(m.clone())
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match=r"ill-conditioned.*jitter"):
        lam, Q = kfac.stable_eigh(mat, "KFAC factor A of layer x")
    jitter = 1e-10 * float(mat.diagonal().mean())
    torch.testing.assert_close(calls[1], mat + jitter * torch.eye(6, dtype=torch.float64), atol=0, rtol=0)
    # decomposed with the jitter, returned without it: the factor's own spectrum
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, mat, atol=1e-10, rtol=0)
    batched = torch.stack([mat, 2 * mat])  # [B, C, C] (GLM predictive covariances): jitter from each diagonal
    calls.clear()
    with pytest.warns(RuntimeWarning, match="jitter"):
        lam, Q = kfac.stable_eigh(batched, "GLM predictive covariance")
    torch.testing.assert_close(calls[1] - batched, 1e-10 * float(batched.diagonal(dim1=-2, dim2=-1).mean())
                               * torch.eye(6, dtype=torch.float64).expand(2, 6, 6), atol=1e-13, rtol=0)
    torch.testing.assert_close(Q @ torch.diag_embed(lam) @ Q.transpose(-1, -2), batched, atol=1e-9, rtol=0)
    with pytest.raises(UqloraError, match="non-finite"):
        kfac.stable_eigh(mat * float("inf"))


def test_svd_failure_falls_back_to_the_gram_matrix(monkeypatch):
    from uqlora.core import kfac

    g = torch.Generator().manual_seed(1)
    full = torch.randn(40, 5, generator=g, dtype=torch.float64)
    deficient = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g,
                                                                                 dtype=torch.float64)
    expected = {k: torch.linalg.svd(m, full_matrices=False)[1] for k, m in (("full", full), ("deficient", deficient))}

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("svd failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    for name, root in (("full", full), ("deficient", deficient)):
        with pytest.warns(RuntimeWarning, match="Gram"):
            U, S = kfac.stable_svd(root)
        rank = 5 if name == "full" else 3  # the rank-3 root keeps 3 directions, not Gram-matrix noise
        assert S.numel() == rank
        torch.testing.assert_close(S, expected[name][:rank], atol=1e-9, rtol=0)
        torch.testing.assert_close(U.T @ U, torch.eye(rank, dtype=torch.float64), atol=1e-9, rtol=0)
        torch.testing.assert_close((U * S) @ (U * S).T, root @ root.T, atol=1e-8, rtol=0)


def test_laplace_run_survives_a_singular_and_an_unsolvable_factor(tmp_path, monkeypatch):
    """End to end: every eigendecomposition of the fit fails once (jitter fallback, warned), and the last
    layer's input factor is singular (more dimensions than examples): the run completes with finite metrics."""
    from uqlora.tasks import train

    real, failed = torch.linalg.eigh, []

    def flaky(m, *a, **k):  # every factor's first attempt fails; the jittered retry succeeds
        if m.shape[-1] > 3 and (not failed or failed[-1] is not None):
            failed.append(None)
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        if failed and failed[-1] is None:
            failed[-1] = tuple(m.shape)
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    cfg = _cfg(tmp_path, "run", "model=tiny_bert", "method=laplace", "trainer.max_steps=4",
               "data.max_train_samples=16", "data.max_test_samples=16")  # 16 examples < 33 head inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, _ = train(cfg)
    assert len(failed) >= 4 and all(failed) and sum("jitter" in str(w.message) for w in caught) >= 4
    assert all(np.isfinite(v) for v in metrics["test"].values() if isinstance(v, float))


def test_swag_with_fewer_snapshots_than_k_samples_with_a_warning(tmp_path):
    from uqlora.tasks import train

    cfg = _cfg(tmp_path, "run", "model=tiny_bert", "method=swag", "method.max_rank=10", "method.unit=step",
               "method.start=10", "method.collect_every=3", "method.num_samples=5", "trainer.max_steps=20")
    with pytest.warns(RuntimeWarning, match=r"SWAG collected 3 snapshot\(s\), fewer than K=10"):
        metrics, obj = train(cfg)
    samples = np.load(tmp_path / "run" / "predictions" / "test.npz")["samples"]
    assert samples.shape[0] == 5 and not np.allclose(samples[0], samples[1])  # it sampled
    assert obj["method"].swag.rank == 3


# --- reproducibility --------------------------------------------------------------------------------------
def test_same_config_and_seed_give_bit_identical_metrics_and_provenance(tmp_path):
    from uqlora.tasks import train

    runs = [train(_cfg(tmp_path, f"r{i}", "model=tiny_bert", "method=mc_dropout", "trainer.max_steps=10",
                       "data.max_test_samples=32"))[1]["results"] for i in range(2)]
    _same_metrics(*runs)
    _same_predictions(tmp_path / "r0", tmp_path / "r1")
    a = runs[0]
    assert a["seed"] == 0 and a["status"] == "complete"
    assert a["versions"]["torch"] == torch.__version__ and a["versions"]["transformers"]
    assert len(a["git"]["commit"] or "") == 40 and isinstance(a["git"]["dirty"], bool)
    assert a["data_files"] and all(len(h) == 64 for h in a["data_files"].values())
    other = train(_cfg(tmp_path, "seed1", "model=tiny_bert", "method=mc_dropout", "trainer.max_steps=10",
                       "data.max_test_samples=32", "seed=1"))[1]["results"]
    assert other["metrics"]["test"] != a["metrics"]["test"]  # the check can fail: another seed differs


# --- bad input: one line, within seconds ------------------------------------------------------------------
BAD = [
    (["model.lora.r=0"], "model.lora.r=0", "integer >= 1"),
    (["optim.lr=0"], "optim.lr=0", "> 0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001", "> 0"),
    (["method=swag", "method.max_rank=1"], "method.max_rank=1", "integer >= 2"),
    (["eval.prob.alpha=1.5"], "eval.prob.alpha=1.5", "(0, 1)"),
    (["eval.prob.alpha=0"], "eval.prob.alpha=0", "(0, 1)"),
    (["method=mc_dropout", "method.num_samples=0"], "method.num_samples=0", "integer >= 1"),
    (["eval.prob.n_samples=0"], "eval.prob.n_samples=0", "integer >= 1"),
    (["data.max_test_samples=0"], "data.max_test_samples=0", "integer >= 1"),
    (["eval.splits=[test,tset]"], "tset", "train, val, calib, test"),
]


@pytest.mark.parametrize("args,bad,valid", BAD, ids=[b[1] for b in BAD])
def test_impossible_values_are_named_with_their_valid_range(args, bad, valid):
    from uqlora.validate import validate_config

    with pytest.raises(UqloraError) as e:
        validate_config(compose(["model=tiny_bert", *args]))
    assert bad in str(e.value) and valid in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,bad,valid", [BAD[0], BAD[3], BAD[4]], ids=["lora_r", "swag_k", "alpha"])
def test_impossible_values_fail_in_one_line_within_seconds(tmp_path, args, bad, valid):
    """The command line: one ``error:`` line, exit 1, before anything loads (the rules are shared, above)."""
    t0 = time.time()
    p = _train("model=tiny_bert", *QUIET, *args, f"hydra.run.dir={tmp_path}/r", timeout=120)
    assert p.returncode == 1
    line = error_line(p)
    assert bad in line and valid in line, line
    assert "Traceback" not in p.stderr and time.time() - t0 < 60
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing was loaded or trained


def _csv(path: Path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


@pytest.mark.parametrize("case", ["labels_outside_classes", "empty_split"])
def test_bad_data_fails_in_one_line(tmp_path, case):
    train_rows = [(f"good movie {i}", i % 2) for i in range(40)]
    test_rows = [("fine", 0), ("awful", 3)] if case == "labels_outside_classes" else []
    tr, te = _csv(tmp_path / "train.csv", train_rows), _csv(tmp_path / "test.csv", test_rows)
    p = _train("model=tiny_bert", "data=custom_classification", *QUIET, f"data.options.files.train={tr}",
               f"data.options.files.test={te}", "data.options.num_classes=2", f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 1
    line = error_line(p)
    if case == "labels_outside_classes":
        assert "label 3" in line and "0..1" in line, line
    else:
        assert "test" in line and ("empty" in line or "no rows" in line), line


def test_checkpoint_of_another_model_fails_in_one_line(tmp_path):
    src = tmp_path / "src"
    p = _train("model=tiny_bert", "debug=fast", "trainer.max_steps=2", "data.max_test_samples=8", *QUIET,
               f"hydra.run.dir={src}")
    assert p.returncode == 0, p.stderr[-2000:]
    p = _train("model=tiny_bert", "model.lora.r=4", "debug=fast", *QUIET, f"train.ckpt_path={src}/checkpoints/last.ckpt",
               f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 1
    line = error_line(p)
    assert "checkpoint does not match this model" in line and "lora" in line
    p = _train("model=tiny_bert", "debug=fast", *QUIET, f"train.ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/r2")
    assert p.returncode == 1 and "nope.ckpt" in error_line(p)


def test_resume_of_a_directory_that_is_not_a_run_fails_in_one_line(tmp_path):
    p = _train(f"resume={tmp_path}")
    assert p.returncode == 2 and "not a run directory" in error_line(p)


# --- safe loading and secrets -----------------------------------------------------------------------------
def test_every_torch_load_is_weights_only():
    import ast

    offenders = []
    for path in [*(ROOT / "src").rglob("*.py"), ROOT / "train.py", ROOT / "eval.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg == "weights_only" and \
                    isinstance(node.value, ast.Constant) and node.value.value is False:
                offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert not offenders, offenders


def test_no_secret_reaches_a_config_a_log_or_the_run_directory(tmp_path):
    secrets = {"WANDB_API_KEY": "wandb-secret-3f9a1c77e2", "HF_TOKEN": "hf_secretToken9b8c7d6e5f"}
    env = {**ENV, **secrets}  # WANDB_MODE=offline still wins: nothing is sent
    d = tmp_path / "r"
    p = subprocess.run([sys.executable, "train.py", "model=tiny_bert", "debug=fast", "trainer.max_steps=2",
                        "data.max_test_samples=8", "logger.kind=wandb", "progress_bar=none", f"hydra.run.dir={d}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    run_id = (d / "wandb_run_id").read_text().strip()  # a resumed run logs into this same W&B run
    assert [r.name for r in d.glob("wandb/offline-run-*")] and all(r.name.endswith(run_id) for r in d.glob("wandb/offline-run-*"))
    for s in secrets.values():
        assert s not in p.stdout and s not in p.stderr
        for f in d.rglob("*"):
            if f.is_file():
                assert s.encode() not in f.read_bytes(), f


# --- resume plumbing (no training) ------------------------------------------------------------------------
def test_resume_points_prefer_the_directorys_own_checkpoint(tmp_path):
    from uqlora.runs import resume_points

    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    cfg = _cfg(tmp_path, "run", "model=tiny_bert", f"train.ckpt_path={other}")
    assert resume_points(cfg, d, 1) == [str(other)]  # a fresh directory: resume from the given checkpoint
    (d / "checkpoints" / "last.ckpt").write_bytes(b"y")  # ... then it was killed
    with pytest.raises(UqloraError, match="holds an unfinished run"):
        resume_points(cfg, d, 1)  # never restarted from the other run's checkpoint over its own progress
    with open_dict(cfg):
        cfg.resume = True
    assert resume_points(cfg, d, 1) == [str(d / "checkpoints" / "last.ckpt")]
    with open_dict(cfg):
        cfg.optim.lr = 0.5
    with pytest.raises(UqloraError, match=r"optim.lr: 0.001 -> 0.5"):
        resume_points(cfg, d, 1)
    with open_dict(cfg):
        cfg.optim.lr, cfg.trainer.max_steps = 0.001, 10
    with pytest.raises(UqloraError, match="may only grow"):
        resume_points(cfg, d, 1)


def test_expand_resume_rebuilds_the_command_of_a_run_and_of_a_sweep(tmp_path):
    import yaml

    from uqlora.cli import expand_resume

    run = tmp_path / "run dir"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["model=tiny_bert", "train.init_seed=${seed}", "+trainer.profiler=simple", "optim.lr=1e-3"]))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [
        "hydra.sweep.dir=/x", "hydra.mode=MULTIRUN", "hydra.job.chdir=false"]}}}))
    out = expand_resume([f"resume={run}", "optim.lr=2e-3", "trainer.profiler=advanced", "--cfg", "job"])
    assert out[:2] == ["--cfg", "job"]
    assert "train.init_seed=${seed}" in out  # as typed, not interpolated
    assert "optim.lr=2e-3" in out and "optim.lr=1e-3" not in out  # given now wins
    assert "++trainer.profiler=advanced" in out and "+trainer.profiler=simple" not in out
    assert "hydra.job.chdir=false" in out and not any(a.startswith(("hydra.mode", "hydra.sweep.dir")) for a in out)
    assert out[-2:] == [f"hydra.run.dir='{run}'", "resume=true"]

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {
        "task": ["method=map,swag", "seed=0,1"], "hydra": ["hydra/launcher=joblib", f"hydra.sweep.dir={sweep}",
                                                           "hydra.mode=MULTIRUN"]}}}))
    out = expand_resume(["-m", f"resume={sweep}"])
    assert out == ["-m", "method=map,swag", "seed=0,1", "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}",
                   "resume=true"]
    with pytest.raises(UqloraError, match="not a sweep directory"):
        expand_resume(["-m", f"resume={run}"])
    assert expand_resume(["resume=true", "x=1"]) == ["resume=true", "x=1"]
