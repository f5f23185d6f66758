"""Multi-process (DDP) correctness, for real on CPU with 2 processes (gloo):

* the evaluation shards cover every example exactly once, in data order;
* KFAC factors fitted per shard and summed across 2 processes equal the single-process fit (dense and
  low-rank factors);
* ``python train.py trainer=ddp trainer.devices=2`` (Lightning re-launches the script for rank 1) and a
  single-process run on the same data give the same MAP adapter, the same Laplace posterior
  (``checkpoints/method_state.pt``) and the same test metrics; SWAG collects the same moments (slow).

The training comparison is exact in exact arithmetic: 2 processes x batch 16 average their gradients into
the gradient of one batch of 32; with 32 training examples every step is one full pass, so the two runs see
the same examples per step whatever order the distributed sampler draws them in (dropout off, so no
randomness is left)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import open_dict

from conftest import ROOT, compose
from uqlora.distributed import ShardSampler
from uqlora.errors import UqloraError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
NO_DROPOUT = ["model.lora.dropout=0.0", "model.head_dropout=0.0", "++model.config.hidden_dropout_prob=0.0",
              "++model.config.attention_probs_dropout_prob=0.0"]
# 32 training examples: one full batch per step (32, or 2 x 16 under DDP); 8 steps; validation every epoch
RUN = ["model=tiny_bert", "debug=fast", "logger=none", "progress_bar=none", "print_table=false", *NO_DROPOUT,
       "data.max_train_samples=32", "data.max_val_samples=32", "data.max_test_samples=64", "trainer.max_epochs=8",
       "trainer.max_steps=8", "trainer.val_check_interval=1.0"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process(tmp_path, name, *overrides):
    from uqlora.tasks import train

    cfg = compose(list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / name)
    return train(cfg)


def _ddp_run(run_dir, *overrides, timeout=300):
    p = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert (run_dir / "train_ddp_process_1.log").is_file(), "rank 1 did not run (no Lightning child process)"
    assert not list(run_dir.rglob("*.tmp")), "a half-written file was left behind"
    return p


def _factors(state):
    """Each layer's Kronecker factors, reconstructed from the saved eigendecompositions."""
    post = state["posterior"]
    out = {}
    for i, name in enumerate(post["names"]):
        for k, q, lam in (("A", "Qa", "la"), ("G", "Qg", "lg")):
            Q, lv = post[q][i].double(), post[lam][i].double()
            out[f"{name}.{k}"] = (Q * lv) @ Q.T
    return out


# --- shards -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (1, 2), (0, 2), (64, 4)])
def test_shard_sampler_covers_each_example_exactly_once_in_order(n, world):
    shards = [list(ShardSampler(n, world, r)) for r in range(world)]
    assert sum(shards, []) == list(range(n))                      # rank order = data order, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(len(ShardSampler(n, world, r)) == len(s) for r, s in enumerate(shards))
    with pytest.raises(ValueError):
        ShardSampler(n, world, world)


# --- KFAC factors summed across 2 real processes ------------------------------------------------------------
class _LoRANet(torch.nn.Module):
    """x [B, T, 5] -> frozen base + LoRA (B A) -> tanh -> masked mean over T -> head (3 classes), float64."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = torch.nn.Linear(5, 4).requires_grad_(False)
        self.lora_A = torch.nn.Linear(5, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, 4, bias=False)
        self.head_input = torch.nn.Identity()
        self.head = torch.nn.Linear(4, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7

    def head_parameters(self):
        return self.head.weight, self.head.bias

    def logits(self, batch):
        x, m = batch["x"], batch["attention_mask"].unsqueeze(-1).double()
        h = torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))
        return self.head(self.head_input((h * m).sum(1) / m.sum(1)))


def _batches(lo=0, hi=11, bs=2):
    g = torch.Generator().manual_seed(3)
    n, T = 11, 4
    data = {"x": torch.randn(n, T, 5, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (n,), generator=g),
            "attention_mask": (torch.arange(T)[None] < torch.randint(1, T + 1, (n,), generator=g)[:, None]).long()}
    return [{k: v[i:min(i + bs, hi)] for k, v in data.items()} for i in range(lo, hi, bs)]


VARIANTS = {"dense": (100, 10), "lowrank": (3, 3)}  # (lowrank_threshold, n_kfac): widths 4-5 kept at rank 3


def _fit(batches, variant):
    from uqlora.core.kfac import fit_kfac, select_layers

    net = _LoRANet()
    layers = select_layers(net, "all")
    threshold, rank = VARIANTS[variant]
    res = fit_kfac(net, batches, layers, progress=False, lowrank_threshold=threshold, n_kfac=rank, allow_empty=True)
    return layers, res


def _kfac_worker(rank, port, out_dir):
    import torch.distributed as dist

    from uqlora.core.kfac import reduce_kfac

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for variant in VARIANTS:
            sh = ShardSampler(11, 2, rank)
            layers, res = _fit(_batches(sh.start, sh.end), variant)
            res = reduce_kfac(res)
            out[variant] = {"n": res.n_data, "ll": res.log_lik,
                            "factors": {f"{lay.name}.{k}": getattr(lay, k).dense() for lay in layers for k in "AG"}}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_kfac_factors_summed_across_two_processes_equal_one_process(tmp_path):
    """Each of 2 gloo processes fits its shard, reduce_kfac sums them. Dense factors: equal to one process over
    all the data. Low-rank factors: Factor.merge of the two shards' rank-3 fits (the documented way to add
    low-rank factors: the stacked square roots re-truncated). Both processes end with the same factors."""
    mp.spawn(_kfac_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole, ref = _fit(_batches(bs=3), "dense")                  # one process, all the data, exact
    assert ref.n_data == 11
    for variant, (threshold, n_kfac) in VARIANTS.items():
        shards = [_fit(_batches(ShardSampler(11, 2, r).start, ShardSampler(11, 2, r).end), variant)[0]
                  for r in range(2)]
        expect = {}
        for lay, lay0, lay1 in zip(whole, *shards):
            for k in "AG":
                exact = getattr(lay, k).dense()
                if exact.shape[0] <= threshold:
                    expect[f"{lay.name}.{k}"] = exact
                else:
                    getattr(lay0, k).dense()  # each process first truncates its own sum to rank n_kfac
                    getattr(lay0, k).merge(getattr(lay1, k))
                    expect[f"{lay.name}.{k}"] = getattr(lay0, k).dense()
                    assert torch.linalg.matrix_rank(expect[f"{lay.name}.{k}"]) <= n_kfac < exact.shape[0]
        assert (variant == "lowrank") == any(lay.A.lowrank or lay.G.lowrank for lay in shards[0])
        for got in (ranks[0][variant], ranks[1][variant]):      # both processes hold the same sums
            assert got["n"] == 11
            assert got["ll"] == pytest.approx(ref.log_lik, rel=1e-12)
            assert got["factors"].keys() == expect.keys()
            for key, f in got["factors"].items():
                torch.testing.assert_close(f, expect[key], rtol=1e-9, atol=1e-12)
        for key in ranks[0][variant]["factors"]:
            assert torch.equal(ranks[0][variant]["factors"][key], ranks[1][variant]["factors"][key])


# --- the pipeline under DDP ---------------------------------------------------------------------------------
def test_ddp_outside_a_script_fails_with_one_line(tmp_path):
    from uqlora.build import build_trainer

    cfg = compose([*RUN, *DDP])
    with pytest.raises(UqloraError, match="python train.py"):
        build_trainer(cfg, tmp_path, False, [])


def test_sharded_strategies_are_refused_before_fit(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from uqlora.methods.base import UQMethod
    from uqlora.build import build_trainer

    module = lambda strategy: SimpleNamespace(trainer=SimpleNamespace(strategy=strategy))  # noqa: E731
    with pytest.raises(UqloraError, match="use trainer=ddp"):
        UQMethod.setup(module(FSDPStrategy()), "fit")
    UQMethod.setup(module(DDPStrategy()), "fit")  # replicated weights: fine
    if not torch.cuda.is_available():  # trainer=fsdp is GPU-only: one line, not a traceback
        with pytest.raises(UqloraError, match="strategy=FSDPStrategy"):
            build_trainer(compose([*RUN, "trainer=fsdp"]), tmp_path, False, [])


def test_ddp_two_processes_match_one_process_laplace(tmp_path):
    """Acceptance: 2 gloo processes vs 1 process -- same MAP adapter, same KFAC posterior, same test metrics;
    the DDP factors also equal a single-process KFAC fit on the DDP run's own adapter."""
    from uqlora.core.kfac import fit_kfac, select_layers
    from uqlora.build import setup

    ddp = tmp_path / "ddp"
    _ddp_run(ddp, *RUN, "method=laplace", "data.batch_size=16", *DDP)
    m1, objs = _in_process(tmp_path, "single", *RUN, "method=laplace", "data.batch_size=32")
    one = objs["run_dir"]

    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, ddp))
    assert r2["train"]["steps"] == r1["train"]["steps"] == 8
    assert r2["train"]["posthoc"]["fit_processes"] == 2 and r1["train"]["posthoc"]["fit_processes"] == 1
    assert r2["train"]["posthoc"]["n_fit"] == r1["train"]["posthoc"]["n_fit"] == r2["splits"]["train"] == 32
    # training: the averaged gradients of 2 x 16 examples = the gradient of the 32
    a1, a2 = (torch.load(d / "checkpoints" / "adapter.pt", weights_only=True) for d in (one, ddp))
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=0, atol=5e-6)  # float32 sums in another order, 8 Adam steps
    # the posterior: factors summed over the two shards, N, log-likelihood, prior precision
    s1, s2 = (torch.load(d / "checkpoints" / "method_state.pt", weights_only=True) for d in (one, ddp))
    f1, f2 = _factors(s1), _factors(s2)
    for k in f1:  # the adapters agree to 5e-6 (above) on LoRA B entries of ~1e-2, so factors built from B's
        # gradients (the LoRA A layers' output factors) agree to ~1e-3 relative; a missing shard would be ~50% off
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-3, atol=1e-3 * float(f1[k].abs().max()))
    assert s2["posterior"]["n_data"] == s1["posterior"]["n_data"] == 32
    assert s2["posterior"]["log_lik"] == pytest.approx(s1["posterior"]["log_lik"], rel=1e-5)
    torch.testing.assert_close(s2["posterior"]["prior_precision"], s1["posterior"]["prior_precision"], rtol=1e-4,
                               atol=0)
    # the test split: every example predicted once, in data order, with the same predictive and metrics
    p1, p2 = (np.load(d / "predictions" / "test.npz") for d in (one, ddp))
    assert len(p2["ids"]) == len(set(p2["ids"].tolist())) == 64
    assert np.array_equal(p2["ids"], p1["ids"]) and np.array_equal(p2["labels"], p1["labels"])
    np.testing.assert_allclose(p2["probs"], p1["probs"], rtol=0, atol=1e-5)
    for k in ("acc", "nll", "ece", "brier", "aurc"):
        assert r2["metrics"]["test"][k] == pytest.approx(m1["test"][k], abs=1e-5), k
    # the reduction alone, on identical weights: one process, the DDP run's adapter, the whole train split
    method, dm = setup(compose([*RUN, "method=laplace", "data.batch_size=32"]))
    method.backbone.load_trainable_state_dict(a2)
    layers = select_layers(method.backbone, "all")
    ref = fit_kfac(method.backbone, dm.loader("train"), layers, progress=False, lowrank_threshold=1024)
    assert ref.n_data == 32
    for lay in layers:
        for k in "AG":
            exact = getattr(lay, k).dense()
            torch.testing.assert_close(f2[f"{lay.name}.{k}"], exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_swag(tmp_path):
    """SWAG under DDP: every process collects the same snapshots (checked against rank 0 at the end of fit),
    rank 0 alone saves them, and they equal the single-process run's."""
    swag = ["method=swag", "method.collect_every=1", "method.max_rank=3", "method.num_samples=4"]
    ddp = tmp_path / "ddp"
    _ddp_run(ddp, *RUN, *swag, "data.batch_size=16", *DDP)
    m1, objs = _in_process(tmp_path, "single", *RUN, *swag, "data.batch_size=32")
    s1, s2 = (torch.load(d / "checkpoints" / "method_state.pt", weights_only=True) for d in (objs["run_dir"], ddp))
    assert int(s2["n"]) == int(s1["n"]) == 4                     # steps 5..8: collected once, not once per process
    for k in ("mean", "sq_mean", "dev"):
        torch.testing.assert_close(s2[k], s1[k], rtol=0, atol=1e-6)
    r2 = json.loads((ddp / "results.json").read_text())
    for k in ("acc", "nll", "ece"):
        assert r2["metrics"]["test"][k] == pytest.approx(m1["test"][k], abs=1e-5), k
