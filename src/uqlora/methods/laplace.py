"""Laplace-LoRA (Yang, Robeyns, Wang and Aitchison, ICLR 2024): a post-hoc Kronecker-factored Laplace
approximation over the LoRA (+ head) weights of a MAP fine-tuned model.

Stages: MAP training (or the adapter of a finished run, ``method.map_run=<run dir>``) -> KFAC factors over
the ``fit_split`` (train; never test) in eval mode, under DDP one shard per process summed across processes
-> prior precision (``prior.method``: ``val_nll``, the default, the predictive NLL on ``prior.split`` by grid
or gradient search; ``marglik`` the evidence, as the paper; ``fixed``) ->
predictive: linearised GLM (``link``: probit | mc | bridge) or NN sampling (``pred_type=nn``).

``subset=all`` covers every LoRA A/B matrix and the trained head; ``subset=last_layer`` the head only
(the last-layer Laplace baseline, LLLA). Factor wider than ``lowrank_threshold``: rank ``n_kfac``.
The fitted posterior is ``checkpoints/method_state.pt``; ``eval.py`` reuses it without refitting.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import List

import torch

from uqlora import distributed as dist
from uqlora.core.kfac import capture, fit_kfac, per_example_jacobians, reduce_kfac, select_layers
from uqlora.core.laplace import KronPosterior, example_draws, glm_predictive
from uqlora.core.laplace_prior import tune_marglik, tune_val_nll
from uqlora.errors import UqloraError
from uqlora.methods import register
from uqlora.methods.posthoc import PostHocConfig, PostHocMethod
from uqlora.schema import POSITIVE_LIST, Choice, at_least, positive, rule

log = logging.getLogger(__name__)


class Split(Choice):
    train = "train"
    val = "val"
    calib = "calib"


class PriorMethod(Choice):
    marglik = "marglik"
    val_nll = "val_nll"
    fixed = "fixed"


class Structure(Choice):
    scalar = "scalar"
    layerwise = "layerwise"


class Search(Choice):
    grid = "grid"
    gradient = "gradient"


class Subset(Choice):
    all = "all"
    last_layer = "last_layer"


class Fisher(Choice):
    exact = "exact"
    mc = "mc"
    empirical = "empirical"


class KfacApprox(Choice):
    expand = "expand"
    expand_sum = "expand_sum"
    reduce = "reduce"


class PredType(Choice):
    glm = "glm"
    nn = "nn"


class Link(Choice):
    probit = "probit"
    mc = "mc"
    bridge = "bridge"


@dataclass
class PriorConfig:
    method: PriorMethod = PriorMethod.val_nll  # val_nll | marglik (the paper's) | fixed
    structure: Structure = Structure.scalar    # scalar | layerwise (one precision per layer)
    init: float = positive(1.0)                # starting value (the value itself for method=fixed)
    split: Split = Split.val                   # val_nll: the split whose NLL is minimised
    search: Search = Search.grid               # val_nll: grid (scalar) | gradient
    grid: List[float] = rule([10.0 ** (k / 2) for k in range(-8, 9)], POSITIVE_LIST)
    steps: int = at_least(1, 300)              # Adam steps (marglik; val_nll gradient)
    lr: float = positive(0.1)


# the GLM predictive's Jacobians: at most this many (example x position x class) rows of output gradients at once
# (one batch of 32 four-choice MMLU questions, ~400 packed tokens each, is ~51k rows: 22 GB on SmolLM2-135M)
GLM_CHUNK_ROWS = 16384


def example_chunks(batch: dict, max_rows: int, num_classes: int = 1):
    """``batch`` split into consecutive groups of examples, each with at most ``max_rows`` rows of
    (positions x ``num_classes``) -- at least one example per group. Tensors (and lists) whose first dimension is a
    multiple of the number of examples B are sliced per example (R rows each: the separate cloze layout has C
    rows per question); the rest is shared. One group (the batch itself) when it fits."""
    B = int(batch["labels"].shape[0])
    mask = batch.get("attention_mask")
    per_example = (mask.numel() // max(B, 1) if mask is not None else 1) * max(int(num_classes), 1)
    k = max(1, max_rows // max(per_example, 1))
    if k >= B:
        yield batch
        return

    def part(v, i, j):
        n = v.shape[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else len(v) if isinstance(v, list) else None
        if not n or n % B:
            return v
        r = n // B
        return v[i * r: j * r]

    for i in range(0, B, k):
        yield {key: part(v, i, min(i + k, B)) for key, v in batch.items()}


@dataclass
class LaplaceConfig(PostHocConfig):
    name: str = "laplace"
    display_name: str = "Laplace-LoRA"
    subset: Subset = Subset.all                # all | last_layer
    fisher: Fisher = Fisher.exact              # exact | mc | empirical
    kfac_approx: KfacApprox = KfacApprox.expand  # expand | expand_sum | reduce (over token positions; core/kfac.py)
    fisher_samples: int = at_least(1, 1)       # mc: labels sampled per example
    n_kfac: int = at_least(1, 10)              # rank kept for wide factors (paper: 10)
    lowrank_threshold: int = at_least(1, 1024)  # factors wider than this are low rank (paper: 100, for 4096-wide LLMs)
    fit_split: Split = Split.train
    prior: PriorConfig = field(default_factory=PriorConfig)
    pred_type: PredType = PredType.glm         # glm | nn
    link: Link = Link.mc                       # glm: mc (the official code's mc_corr) | probit | bridge
    num_samples: int = at_least(1, 100)        # mc link: logit samples; nn: weight draws
    eval_seed: int = 0
    seed: int = 0                              # mc Fisher labels


@register("laplace", LaplaceConfig)
class LaplaceMethod(PostHocMethod):
    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        c = self.mcfg
        if c.prior.method == "val_nll" and c.prior.search == "grid" and c.prior.structure == "layerwise":
            raise UqloraError("method.prior.structure=layerwise needs prior.search=gradient (a grid covers one scalar)")
        self.layers = select_layers(backbone, str(c.subset))
        self.posterior: KronPosterior | None = None
        self.tuning: dict = {}
        self._draws = None
        self._gen_draws = None  # weight draws for free-text generation (made on first use)
        self._gen: torch.Generator | None = None

    # --- fitting ------------------------------------------------------------------------------------------
    def fit(self, datamodule) -> None:
        c = self.mcfg
        device = self.fit_device()
        # DDP: each process fits the factors on its contiguous shard of fit_split, then the sums are added up
        # across processes (reduce_kfac): N / W examples per process and one all-reduce of the factors, the same
        # factors as one process over the whole split. mc Fisher: an independent label stream per process.
        world, rank = dist.world_size(), dist.global_rank()
        batches = self.batches(datamodule.loader(self.fit_split), "Laplace: KFAC factors", shard=True)
        res = fit_kfac(self.backbone, batches, self.layers, fisher=str(c.fisher),
                       n_samples=int(c.fisher_samples), lowrank_threshold=int(c.lowrank_threshold),
                       n_kfac=int(c.n_kfac), device=device, seed=int(c.seed) + (rank if world > 1 else 0),
                       progress=False, approx=str(c.kfac_approx), allow_empty=world > 1)
        res = reduce_kfac(res)
        post = KronPosterior.from_kfac(res, float(c.prior.init), str(c.prior.structure))
        post = KronPosterior.from_state_dict({k: _cpu(v) for k, v in post.state_dict().items()})
        self.posterior = post
        self.tuning = {"n_fit": res.n_data, "log_lik": res.log_lik, "params": post.num_params,
                       "posterior_floats": post.memory_floats(),
                       "log_marglik_init": float(post.log_marginal_likelihood())}
        if c.prior.method == "marglik":
            self.tuning.update(tune_marglik(post, steps=int(c.prior.steps), lr=float(c.prior.lr)))
        elif c.prior.method == "val_nll":
            self._tune_val_nll(datamodule, device)
        if world > 1:  # every process tuned the prior on the same sums (val_nll: on the whole prior.split each);
            post.prior_precision = dist.broadcast_object(post.prior_precision.cpu())  # rank 0's, bit for bit
        self.tuning["fit_processes"] = world
        self.tuning.update(prior_precision=[float(d) for d in post.prior_precision.unique()] if c.prior.structure == "scalar"
                           else [float(d) for d in post.prior_precision],
                           log_marglik=float(post.log_marginal_likelihood()))
        log.info("Laplace: %d params in %d layers, N=%d, prior precision %s, log evidence %.2f",
                 post.num_params, len(self.layers), res.n_data, self.tuning["prior_precision"][:4],
                 self.tuning["log_marglik"])

    def _glm_terms(self, batch):
        """``(f_mu [B, C], projections)`` of one batch: one forward and one vmapped backward pass per chunk of
        examples (:func:`example_chunks`: the C output gradients of every position of every layer are held at
        once, so a batch of long questions -- MMLU's -- is split to bound that memory; per-example results)."""
        parts = [self._glm_chunk(b) for b in example_chunks(batch, GLM_CHUNK_ROWS, self.backbone.num_classes)]
        if len(parts) == 1:
            return parts[0]
        f_mu = torch.cat([f for f, _ in parts])
        proj = [(torch.cat([p[k][0] for _, p in parts]),
                 None if parts[0][1][k][1] is None else torch.cat([p[k][1] for _, p in parts]))
                for k in range(len(parts[0][1]))]
        return f_mu, proj

    def _glm_chunk(self, batch):
        with torch.enable_grad():
            with capture(self.layers):
                logits = self.backbone.logits(batch)
            jacs = per_example_jacobians(self.layers, logits, batch)
        post = self.posterior  # kept on the CPU: Jacobians are projected there
        return logits.detach(), post.project([J.to(post.Qa[0].device) for J in jacs])

    def _tune_val_nll(self, datamodule, device) -> None:
        c, post = self.mcfg, self.posterior
        def batches():  # read once by tune_val_nll (streamed for the probit grid search, else cached)
            for batch in self.batches(datamodule.loader(str(c.prior.split)), f"Laplace: prior on {c.prior.split}"):
                f_mu, proj = self._glm_terms(batch)
                proj = [(m.float().cpu(), None if i is None else i.cpu()) for m, i in proj]
                mask = batch.get("choice_mask")
                yield f_mu.double().cpu(), proj, batch["labels"].cpu(), None if mask is None else mask.cpu()

        # tuned with the predictive it will be used with (mc: the same draws for every candidate prior)
        self.tuning.update(tune_val_nll(post, batches(), list(c.prior.grid), str(c.prior.search),
                                        str(c.prior.structure), int(c.prior.steps), float(c.prior.lr), str(c.link),
                                        int(c.num_samples), int(c.eval_seed)))

    # --- predictive -----------------------------------------------------------------------------------------
    def _require(self):
        if self.posterior is None:
            raise UqloraError("Laplace predictive before the posterior was fitted or loaded")
        return self.posterior

    def start_predict(self):
        post = self._require()
        c = self.mcfg
        self._gen = torch.Generator().manual_seed(int(c.eval_seed))
        if c.pred_type == "nn":
            self._draws = post.sample(int(c.num_samples), generator=self._gen)

    def end_predict(self):
        if self._draws is not None:
            self._assign(self.posterior.theta)
        self._draws = None

    def _assign(self, mats) -> None:
        for lay, m in zip(self.layers, mats):
            lay.assign(m)

    def _glm(self, batch):
        post = self._require()
        if self._gen is None:
            self.start_predict()
        f_mu, proj = self._glm_terms(batch)
        fvar = post.functional_variance(proj)
        c = self.mcfg
        eps = None
        if c.link == "mc" and batch.get("index") is not None:  # per-example draws: independent of batching / processes
            eps = example_draws(batch["index"], int(c.num_samples), f_mu.shape[-1], int(c.eval_seed))
        probs, samples = glm_predictive(f_mu.cpu(), fvar.cpu(), str(c.link), int(c.num_samples),
                                        generator=self._gen, mask=_cpu(batch.get("choice_mask")), eps=eps)
        dev = batch["labels"].device
        return probs.float().to(dev), None if samples is None else samples.float().to(dev)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if self.mcfg.pred_type != "glm":
            return super().predict_step(batch, batch_idx, dataloader_idx)
        probs, samples = self._glm(batch)  # one forward + one vmapped backward per batch, for every link
        out = {"probs": probs, "labels": batch["labels"]}
        if samples is not None:
            out["samples"] = samples
        return out

    def predictive(self, batch):
        if self.mcfg.pred_type == "glm":
            return self._glm(batch)[0]
        return self.predictive_samples(batch).mean(0)

    def predictive_samples(self, batch):
        if self.mcfg.pred_type == "glm":
            return self._glm(batch)[1]  # None unless link=mc
        if self._draws is None:
            self.start_predict()
        out = []
        for s in range(self._draws[0].shape[0]):
            self._assign([d[s] for d in self._draws])
            out.append(self(batch).softmax(-1))
        self._assign(self.posterior.theta)
        return torch.stack(out)

    def num_weight_samples(self) -> int:
        return int(self.mcfg.num_samples)

    @contextlib.contextmanager
    def weight_sample(self, s: int):
        """Weight draw ``s`` from the posterior (also for pred_type=glm: a linearised predictive has no
        generative counterpart, so generation samples the network's weights)."""
        post = self._require()
        if self._gen_draws is None:
            self._gen_draws = post.sample(int(self.mcfg.num_samples),
                                          generator=torch.Generator().manual_seed(int(self.mcfg.eval_seed)))
        self._assign([d[int(s)] for d in self._gen_draws])
        try:
            yield
        finally:
            self._assign(post.theta)

    # --- persistence ------------------------------------------------------------------------------------------
    def fitted_state(self):
        return {"posterior": self.posterior.state_dict(), "subset": str(self.mcfg.subset),
                "tuning": {k: v for k, v in self.tuning.items() if isinstance(v, (int, float, list))}}

    def load_fitted_state(self, state):
        if "posterior" not in state:
            raise UqloraError("this run directory has no fitted Laplace posterior (checkpoints/method_state.pt)")
        post = KronPosterior.from_state_dict(state["posterior"])
        names = [lay.name for lay in self.layers]
        if post.names != names:
            raise UqloraError(f"the saved posterior covers other layers ({len(post.names)}, subset="
                              f"{state.get('subset')}) than this model ({len(names)}, subset={self.mcfg.subset})")
        self.posterior = post
        self._gen_draws = None  # weight draws of the previous posterior (another member) are stale
        self.tuning = dict(state.get("tuning", {}))
        self._assign(post.theta)


def _cpu(v):
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    return v
