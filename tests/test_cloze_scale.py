"""The learned cloze scale (``model.cloze_scale=learned``): logits = exp(s) x the normalised log-likelihoods, s
trained with the adapter, saved with it, exported and re-imported with it; post-hoc methods on such a run."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose
from uqlora import load_backbone, load_data
from uqlora.errors import UqloraError
from uqlora.rundir import RunDir
from uqlora.tasks import train

FAST = ["debug=fast", "logger=none", "progress_bar=none", "print_table=false", "model=tiny_llama", "data=arc_e"]
LEARNED = "model.cloze_scale=learned"


def _batch(bb, n=8):
    return bb.collator(load_data(bb, max_test_samples=n, max_train_samples=16)["test"][:n])


def test_learned_scale_multiplies_the_fixed_scores_and_trains():
    fixed = load_backbone("tiny_llama", data="arc_e").eval()
    learned = load_backbone("tiny_llama", data="arc_e", overrides=[LEARNED]).eval()
    assert fixed.log_scale is None and learned.log_scale.requires_grad
    assert "log_scale" in learned.trainable_state_dict() and "log_scale" not in fixed.trainable_state_dict()
    learned.load_trainable_state_dict({**fixed.trainable_state_dict(), "log_scale": torch.tensor(0.7)})
    batch = _batch(fixed)
    mask = batch["choice_mask"].bool()
    with torch.no_grad():
        a, b = fixed.logits(batch), learned.logits(batch)
    torch.testing.assert_close(b[mask], a[mask] * torch.tensor(0.7).exp(), rtol=1e-5, atol=1e-6)
    assert (b[~mask] == a[~mask]).all()  # missing choices stay masked
    learned.logits(batch).logsumexp(-1).sum().backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs() > 0


def test_bad_scale_fails_in_one_line(tmp_path):
    cfg = compose([*FAST, "model.cloze_scale=nosuch"])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "bad")
    with pytest.raises(UqloraError, match="model.cloze_scale.*valid.*fixed, learned") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def _run(tmp_path, name, *overrides):
    cfg = compose([*FAST, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / name)
    metrics, objs = train(cfg)
    (objs["run_dir"] / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, objs["run_dir"] / ".hydra" / "config.yaml")
    return metrics, RunDir(objs["run_dir"])


def test_map_run_trains_saves_and_exports_the_scale_and_laplace_reuses_it(tmp_path):
    _, run = _run(tmp_path, "map", "method=map", LEARNED, "optim.lr=1e-5", "trainer.max_steps=4")
    s = run.adapter()["log_scale"]
    # trained at its own rate (model.cloze_scale_lr=0.05; Adam moves it by ~that per step, ~1e-5 at the
    # adapter's), at most the sum of the scheduled rates (warm-up 1 step, then linear decay: 0.05 x 3)
    assert s.shape == () and 0.02 < abs(float(s)) <= 0.15 + 1e-6
    meta = json.loads((run.adapter_dir / "uqlora_adapter.json").read_text())
    assert meta["cloze_scale"] == "learned"
    again = load_backbone("tiny_llama", data="arc_e", adapter=run.adapter_dir, overrides=[LEARNED]).eval()
    torch.testing.assert_close(again.log_scale.detach(), s)
    with pytest.raises(UqloraError, match="add model.cloze_scale=learned"):
        load_backbone("tiny_llama", data="arc_e", adapter=run.adapter_dir)
    # a post-hoc method on that run keeps the trained scale (it is not in the Laplace posterior)
    metrics, lap = _run(tmp_path, "lap", "method=laplace", LEARNED, f"method.map_run={run.path}")
    assert torch.equal(lap.adapter()["log_scale"], s)
    assert 0 < metrics["test"]["acc"] <= 1 and metrics["test"]["nll"] > 0
