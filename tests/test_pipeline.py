"""End to end: train.py's task function on tiny models (code paths) and on the real packaged models
(subsampled), the run directory it writes, and eval.py reproducing its numbers."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose
from uqlora.metrics import evaluate_predictions
from uqlora.context import RunContext
from uqlora.tasks import evaluate_run, train

FAST = ["debug=fast", "logger=none", "progress_bar=none", "print_table=false"]


def _train(tmp_path, *overrides):
    cfg = compose([*FAST, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    metrics, objs = train(cfg)
    # the run directory a real run gets from Hydra also holds the composed config
    (objs["run_dir"] / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, objs["run_dir"] / ".hydra" / "config.yaml")
    return cfg, metrics, objs


def _check_run_dir(run_dir, metrics, n_classes):
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["metrics"]) == {"test"}
    for key in ("acc", "ece", "mce", "nll", "brier", "aurc", "auroc_misclf"):
        assert key in res["metrics"]["test"]
    assert res["timings"]["total"] > 0 and "fit" in res["timings"]
    assert res["versions"]["torch"] and res["seed"] == 0
    pred = np.load(run_dir / "predictions" / "test.npz")
    assert pred["probs"].shape == (len(pred["labels"]), n_classes)
    np.testing.assert_allclose(pred["probs"].sum(1), 1.0, atol=1e-5)
    again = evaluate_predictions(pred["probs"], pred["labels"])
    assert again["acc"] == pytest.approx(metrics["test"]["acc"]) and again["ece"] == pytest.approx(metrics["test"]["ece"])
    assert (run_dir / "plots" / "reliability_test.png").stat().st_size > 1000
    state = torch.load(run_dir / "checkpoints" / "adapter.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    torch.load(run_dir / "checkpoints" / "method_state.pt", weights_only=True)
    return res


@pytest.mark.parametrize("model,data,head,C", [
    ("tiny_bert", "sst2", "ClassifierBackbone", 2),
    ("tiny_llama", "sst2", "LMChoicesBackbone", 2),
    ("tiny_llama", "arc_e", "LMClozeBackbone", 5),
    ("tiny_llama", "wg_s", "LMClozeBackbone", 2),
])
def test_tiny_runs_write_the_run_directory(tmp_path, model, data, head, C):
    cfg, metrics, objs = _train(tmp_path, f"model={model}", f"data={data}", "trainer.max_steps=4",
                                "trainer.val_check_interval=2", "data.max_test_samples=16", "data.batch_size=4")
    assert type(objs["method"].backbone).__name__ == head
    res = _check_run_dir(objs["run_dir"], metrics, C)
    assert res["train"]["steps"] == 4 and res["train"]["best_val_loss"] is not None


def test_eval_reproduces_test_metrics_and_never_overwrites(tmp_path):
    cfg, metrics, objs = _train(tmp_path, "model=tiny_bert", "trainer.max_steps=4", "data.max_test_samples=24")
    before = (objs["run_dir"] / "results.json").read_bytes()
    ecfg = compose(["run_dir=" + str(objs["run_dir"])], config_name="eval")
    with open_dict(ecfg):
        ecfg.print_table = False
        ecfg.run_dir = str(objs["run_dir"])
    # outside Hydra the eval output dir comes from ecfg.run_dir: point it at a fresh folder
    ecfg2 = OmegaConf.merge(ecfg, {"run_dir": str(objs["run_dir"])})
    m2, _ = evaluate_run(ecfg2, RunContext(tmp_path / "eval_out"))
    for k in ("acc", "nll", "ece", "brier"):
        assert m2["test"][k] == pytest.approx(metrics["test"][k], abs=1e-6)
    assert (objs["run_dir"] / "results.json").read_bytes() == before
    assert (tmp_path / "eval_out" / "results.json").is_file()


def test_real_minilm_training_loss_falls(tmp_path):
    """20 steps of MiniLM + LoRA on 32 real SST-2 sentences (5 epochs): the epoch loss falls."""
    cfg, metrics, objs = _train(tmp_path, "model=minilm", "data=sst2", "trainer.max_steps=20",
                                "trainer.max_epochs=5", "data.max_train_samples=32", "data.max_test_samples=64",
                                "optim.lr=3e-3", "optim.warmup_ratio=0", "logger.kind=csv")
    import csv

    rows = list(csv.DictReader(open(objs["run_dir"] / "csv" / "metrics.csv")))
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 5
    assert epoch_losses[-1] < epoch_losses[0] - 0.05, epoch_losses
    _check_run_dir(objs["run_dir"], metrics, 2)


def test_real_smollm2_label_words_sst2(tmp_path):
    cfg, metrics, objs = _train(tmp_path, "model=smollm2_135m", "data=sst2", "trainer.max_steps=6",
                                "data.max_test_samples=48", "data.max_val_samples=16", "trainer.val_check_interval=6")
    _check_run_dir(objs["run_dir"], metrics, 2)
    assert objs["method"].backbone.head_kind == "lm_choices"
    # the instruction-tuned model already separates " positive" / " negative" on real reviews
    assert metrics["test"]["acc"] > 0.6


def test_real_smollm2_cloze_arc_e(tmp_path):
    cfg, metrics, objs = _train(tmp_path, "model=smollm2_135m", "data=arc_e", "trainer.max_steps=3",
                                "data.batch_size=4", "data.max_test_samples=40", "data.max_val_samples=8",
                                "trainer.val_check_interval=3")
    _check_run_dir(objs["run_dir"], metrics, 5)
    assert objs["method"].backbone.head_kind == "lm_cloze"
    assert metrics["test"]["acc"] > 0.3  # chance is ~0.25; cloze scoring of SmolLM2 is well above


def test_custom_classification_data_end_to_end(tmp_path):
    import csv

    rng = np.random.default_rng(0)
    words = {"neg": ["awful", "bad", "boring"], "pos": ["great", "lovely", "fun"]}
    for split, n in (("train", 48), ("test", 16)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            for i in range(n):
                lab = ["neg", "pos"][i % 2]
                w.writerow([f"a {rng.choice(words[lab])} movie number {i}", lab])
    cfg, metrics, objs = _train(tmp_path, "model=tiny_bert", "data=custom_classification",
                                f"data.options.files.train={tmp_path}/train.csv",
                                f"data.options.files.test={tmp_path}/test.csv", "data.options.text_column=review",
                                "data.options.label_column=sentiment", "data.options.label_names=[neg,pos]",
                                "trainer.max_steps=4")
    res = _check_run_dir(objs["run_dir"], metrics, 2)
    assert res["splits"]["test"] == 16 and res["splits"]["train"] + res["splits"]["val"] + res["splits"]["calib"] == 48


def test_text_progress_logs_lines_without_a_terminal(tmp_path, caplog):
    """In a log file (no terminal) rich's bar prints nothing until the end; ``text`` logs the steps as they go."""
    import io
    import logging

    from uqlora.progress import resolve_progress_bar
    from uqlora.errors import UqloraError
    from uqlora.validate import validate_config

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_progress_bar("auto", Tty()) == "rich" and resolve_progress_bar("auto", io.StringIO()) == "text"
    assert resolve_progress_bar("none", Tty()) == "none"
    with pytest.raises(UqloraError, match=r"progress_bar.*fancy.*auto.*rich.*text.*none"):
        validate_config(compose([*FAST, "progress_bar=fancy"]))
    with caplog.at_level(logging.INFO, logger="uqlora.callbacks.progress"):
        _train(tmp_path, "model=tiny_bert", "data=sst2", "trainer.max_steps=40", "trainer.val_check_interval=20",
               "data.max_test_samples=8", "data.batch_size=4", "progress_bar=text")
    lines = [r.getMessage() for r in caplog.records
             if r.name == "uqlora.callbacks.progress" and r.getMessage().startswith("train:")]
    # every 5% of 40 steps = every 2 steps: 20 lines, the last at 100% with nothing left
    assert len(lines) == 20 and lines[0].startswith("train: step 2/40 (5%)"), lines[:2]
    assert lines[-1].startswith("train: step 40/40 (100%)") and "~0m00s left" in lines[-1]
    assert all("loss " in line and "elapsed" in line for line in lines)
    # prediction passes: a line every 10% of the batches once the pass is older than quiet_s (short ones: none)
    from types import SimpleNamespace

    from uqlora.callbacks.progress import LineProgress

    trainer = SimpleNamespace(num_predict_batches=[20], is_global_zero=True)

    def predict_pass(quiet_s):
        cb = LineProgress(quiet_s=quiet_s)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="uqlora.callbacks.progress"):
            cb.on_predict_start(trainer, None)
            for b in range(20):
                cb.on_predict_batch_end(trainer, None, None, None, b)
        return cb, [r.getMessage() for r in caplog.records if r.name == "uqlora.callbacks.progress"]

    for quiet_s, expected in ((1e9, 0), (0.0, 10)):
        cb, got = predict_pass(quiet_s)
        assert len(got) == expected and cb.p_done == 20, got
    assert got[0].startswith("predict: batch 2/20 (10%)") and got[-1].startswith("predict: batch 20/20 (100%)")
    assert "~0m00s left" in got[-1]
    with pytest.raises(ValueError, match=r"predict_every=0"):
        LineProgress(predict_every=0)


def test_track_logs_the_loops_outside_the_trainer(caplog, monkeypatch):
    """Post-hoc fits and sampling passes (a TFB search over ARC: two hours) get the same lines in a log file."""
    import io
    import logging

    import uqlora.progress as progress
    from uqlora.progress import track

    def lines(items, **kw):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="uqlora.progress"):
            out = list(track(items, "TFB: sigma 0.2", "text", **kw))
        assert out == list(range(len(out))) and len(out) in (20, 25)  # every item passes through, in order
        return [r.getMessage() for r in caplog.records if r.name == "uqlora.progress"]

    assert lines(range(20)) == []  # younger than QUIET_S: silent
    got = lines(range(20), quiet_s=0)
    assert len(got) == 10 and got[0].startswith("TFB: sigma 0.2: 2/20 (10%), ") and "elapsed" in got[0]
    assert got[-1].startswith("TFB: sigma 0.2: 20/20 (100%)") and got[-1].endswith("~0m00s left")
    assert lines(iter(range(25)), quiet_s=0)[-1].startswith("TFB: sigma 0.2: 20, ")  # no length: every 10 items
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    assert len(lines(range(20), every=0.5)) == 2
    items = [1, 2]
    assert track(items, "x", "none") is items and track(items, "x", False) is items
    from tqdm import tqdm

    assert isinstance(track(items, "x", "rich"), tqdm) and list(track(items, "x", "rich")) == items
    monkeypatch.setattr(progress.sys, "stdout", io.StringIO())  # auto without a terminal: lines
    assert not hasattr(track(items, "x", True), "__len__")
    with pytest.raises(ValueError, match=r"progress mode 'fancy'; valid: auto, rich, text, none"):
        track(items, "x", "fancy")
    with pytest.raises(ValueError, match=r"every=0"):
        track(items, "x", "text", every=0)


def test_precision_auto_uses_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch, caplog):
    """On a CPU without AVX512-BF16 / AMX, bf16 autocast is emulated (~18x slower than float32 for SmolLM2);
    ``auto`` then trains in float32, and results.json says what was used."""
    import logging

    import uqlora.models.precision as prec
    from uqlora.errors import UqloraError
    from uqlora.validate import validate_config

    monkeypatch.setattr(prec.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.effective_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.effective_precision("auto", "cpu") == "32-true"
    assert prec.effective_precision("auto", "auto") == "32-true"  # no GPU here
    prec._warned.clear()
    with caplog.at_level(logging.WARNING, logger="uqlora.models.precision"):
        assert prec.effective_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit value is kept ...
    assert any("emulated" in r.getMessage() for r in caplog.records)      # ... with a warning
    assert prec.effective_precision("32-true", "cpu") == "32-true"
    assert compose(["model=smollm2_135m"]).model.precision == "auto"
    with pytest.raises(UqloraError, match=r"model.precision='fp8' is impossible; valid: .*auto.*32-true.*bf16-mixed"):
        validate_config(compose([*FAST, "model.precision=fp8"]))
    _, _, objs = _train(tmp_path, "model=tiny_llama", "data=sst2", "model.precision=auto", "trainer.max_steps=2",
                        "data.max_test_samples=8", "data.batch_size=4")
    assert objs["method"].precision == "32-true" and objs["method"].trainer.precision == "32-true"
    hw = json.loads((objs["run_dir"] / "results.json").read_text())["hardware"]
    assert hw["precision"] == "32-true" and hw["cpu_native_bf16"] is False and hw["cuda"] is None
