"""Which KFAC definition and which prior precision make Laplace-LoRA predict well -- and why the evidence
picks the prior it does. One MAP model per (model, data, seed), then on that same model, for each KFAC
definition (``reduce``, ``expand``, ``expand_sum``; core/kfac.py):

* the prior precision by the evidence (scalar and layerwise), by the validation NLL (grid, widened when the
  best value is on its edge: core/laplace_prior.py) and, as a diagnostic, by the evidence with LoRA A's prior
  centred at its random initialisation instead of 0;
* test ACC / ECE / NLL / mean confidence of the GLM probit predictive at each of those priors, and the test
  NLL over the whole grid (where the test optimum is);
* the evidence's parts at its optimum, per layer group (LoRA A, LoRA B, head): the squared distance of the
  MAP from the prior mean (scatter / delta) and the effective number of parameters sum lam / (lam + delta);
  at the optimum of a scalar prior, delta = gamma / ||theta - mu||^2 summed over all groups;
* per layer group, the trace of each KFAC definition's curvature over the exact GGN's (per example, the GGN
  from per-example Jacobians on the first ``--ggn-batches`` train batches): the curvature scale.

    python benchmarks/laplace_kfac_study.py --model minilm --data sst2 --train 1000 --epochs 4 [--seeds 0 1]
        [--approx reduce expand expand_sum] [--fisher exact] [--out results.json]

Protocol (the comparison that chooses ``method.kfac_approx``'s default and the default prior method): the MAP
is trained by plain AdamW with the repository's optimiser settings (lr 1e-3, weight decay 0.01, 6% linear
warm-up then linear decay, batch ``data.batch_size``), dropout on, for a fixed budget of ``--epochs`` (the
last step is evaluated, as ``train.restore_best=false``), in float32. KFAC over the train subset, exact
Fisher unless ``--fisher``; the GLM probit predictive (only the diagonal of J Sigma J^T is needed, so every
prior precision is scored from one pass of Jacobians). Val and test are subsets (``--val``, ``--test``) drawn
by the data module. Run it per dataset and seed; causal LMs as well, e.g. ``--model smollm2_135m --data sst2``
(label words, lm_choices) or ``--data arc_e`` (multiple choice, lm_cloze head: LoRA layers only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import compose  # noqa: E402
from uqlora.core.kfac import (KFACResult, add_to_factors, capture, check_eval_mode, fisher_vectors,  # noqa: E402
                              init_factors, per_example_jacobians)
from uqlora.core.laplace import KronPosterior  # noqa: E402
from uqlora.core.laplace_prior import select_on_grid  # noqa: E402
from uqlora.metrics import ece as ece_metric  # noqa: E402
from uqlora.models.base import param_groups  # noqa: E402
from uqlora.build import setup  # noqa: E402

GRID = [10.0 ** (k / 4) for k in range(-16, 17)]  # 1e-4 .. 1e4, quarter decades
GROUPS = ("lora_A", "lora_B", "head")


def group_of(name: str) -> str:
    return "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "head"


def quality(probs: np.ndarray, y: np.ndarray) -> dict:
    p_y = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return {"acc": round(float((probs.argmax(1) == y).mean()), 4), "ece": round(float(ece_metric(probs, y)), 4),
            "nll": round(float(-np.log(p_y).mean()), 4), "conf": round(float(probs.max(1).mean()), 4)}


def train_map(method, dm, epochs: int, lr: float, wd: float, warmup: float = 0.06) -> float:
    """AdamW (the backbone's own-rate parameters in their own group, as training does), linear warm-up then
    linear decay to 0, dropout on; returns the seconds."""
    bb = method.backbone.train()
    opt = torch.optim.AdamW(param_groups(bb), lr=lr, weight_decay=wd)
    total = epochs * len(dm.loader("train", shuffle=True))
    warm = max(1, int(round(warmup * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm
                                              else max(0.0, (total - s) / max(1, total - warm)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader = dm.loader("train", shuffle=True)
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = method.loss(bb.logits(batch), batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        print(f"  MAP epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    bb.eval()
    return time.perf_counter() - t0


def probit_probs(f_mu: torch.Tensor, var: torch.Tensor, mask) -> torch.Tensor:
    """GLM probit predictive from the logits [B, C] and their variances [B, C, K] for K priors -> [K, B, C]."""
    z = f_mu.double().unsqueeze(-1) / torch.sqrt(1.0 + math.pi / 8 * var.clamp(min=0))
    if mask is not None:
        z = z.masked_fill(~mask.bool().unsqueeze(-1), -math.inf)
    return torch.softmax(z, dim=1).permute(2, 0, 1)


def fit_all(method, loader, keys: list[tuple[str, str]], lowrank_threshold: int) -> dict:
    """KFAC factors for every ``(approx, fisher)`` in ``keys`` from one forward pass per batch (one vmapped
    backward per Fisher type): the same factors as :func:`uqlora.core.kfac.fit_kfac` for each."""
    bb = method.backbone.eval()
    check_eval_mode(bb)
    layers = {k: [dataclasses.replace(lay) for lay in method.layers] for k in keys}  # share the captured tensors
    for ls in layers.values():
        init_factors(ls, lowrank_threshold, 10, "cpu")
    gen = torch.Generator().manual_seed(0)
    n, ll = 0, 0.0
    for batch in loader:
        with torch.enable_grad():
            with capture(method.layers):
                logits = bb.logits(batch)
            logp = torch.log_softmax(logits.detach().double(), -1)
            ll += float(logp.gather(1, batch["labels"].unsqueeze(1)).sum())
            fishers = sorted({f for _, f in keys})
            lora = [lay._out[-1] for lay in method.layers if lay.kind == "lora"]
            for i, fisher in enumerate(fishers):
                V = fisher_vectors(logp.exp(), batch["labels"], fisher, 1, gen).to(logits.dtype)
                it = iter(torch.autograd.grad(logits, lora, grad_outputs=V, is_grads_batched=True,
                                              retain_graph=i < len(fishers) - 1) if lora else ())
                grads = [V if lay.kind == "head" else next(it) for lay in method.layers]
                for k in keys:
                    if k[1] == fisher:
                        add_to_factors(layers[k], grads, batch, k[0])
        for lay in method.layers:
            lay._in.clear(), lay._out.clear()
        n += int(batch["labels"].shape[0])
    return {k: KFACResult(layers[k], n, ll) for k in keys}


def logit_variances(method, posts: dict, loader, deltas: dict) -> dict:
    """For each key of ``posts``: the probit inputs for every row of ``deltas[key]`` [K, L] (one prior
    precision per layer) -- ``(f_mu [N, C], var [N, C, K], labels [N], mask)`` -- from one pass of
    per-example Jacobians shared by all posteriors (only the diagonal of J Sigma J^T is needed)."""
    out = {k: [] for k in posts}
    mus, ys, masks = [], [], []
    for batch in loader:
        with torch.enable_grad():
            with capture(method.layers):
                logits = method.backbone.logits(batch)
            jacs = per_example_jacobians(method.layers, logits, batch)
        B, C = logits.shape
        for key, post in posts.items():
            K = deltas[key].shape[0]
            var = torch.zeros(B, C, K, dtype=torch.float64)
            for li, (J, q_a, q_g, lam, full) in enumerate(zip(jacs, post.Qa, post.Qg, post.lam, post.full)):
                Mt = (q_g.T.to(J.dtype) @ J @ q_a.to(J.dtype)).double().reshape(B * C, -1)
                d = deltas[key][:, li]                                                # [K]
                coef = 1.0 / (lam.reshape(-1, 1) + d) - (0.0 if full else 1.0 / d)   # [P_l, K]
                v = (Mt ** 2) @ coef
                if not full:
                    v = v + (J.double() ** 2).sum((-1, -2)).reshape(B * C, 1) / d
                var += v.reshape(B, C, K)
            out[key].append(var)
        mus.append(logits.detach().double())
        ys.append(batch["labels"])
        masks.append(batch.get("choice_mask"))
    mask = None if masks[0] is None else torch.cat(masks)
    f_mu, y = torch.cat(mus), torch.cat(ys)
    return {k: (f_mu, torch.cat(v), y, mask) for k, v in out.items()}


def ggn_traces(method, loader, n_batches: int) -> tuple[torch.Tensor, int]:
    """Per layer, the trace of the exact GGN block averaged over the examples of the first ``n_batches``
    batches: ``mean_n sum_{c,d} Lam_n[c, d] <J_nc, J_nd>`` (Lam = diag p - p p^T), from per-example Jacobians."""
    tot, n = torch.zeros(len(method.layers), dtype=torch.float64), 0
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        with torch.enable_grad():
            with capture(method.layers):
                logits = method.backbone.logits(batch)
            jacs = per_example_jacobians(method.layers, logits, batch)
        p = logits.detach().double().softmax(-1)
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        for li, J in enumerate(jacs):
            Jf = J.double().reshape(J.shape[0], J.shape[1], -1)
            tot[li] += float((lam * (Jf @ Jf.transpose(1, 2))).sum())
        n += int(logits.shape[0])
    return tot / max(n, 1), n


def trace_ratios(res, ggn: torch.Tensor) -> dict:
    """Per layer group: sum of the KFAC blocks' per-example traces tr(G) tr(A) / N^2 over the exact GGN's."""
    kfac = torch.tensor([float(lay.G.dense().trace() * lay.A.dense().trace()) / res.n_data ** 2 for lay in res.layers])
    groups = [group_of(lay.name) for lay in res.layers]
    return {g: round(float(kfac[[x == g for x in groups]].sum() / ggn[[x == g for x in groups]].sum()), 4)
            for g in GROUPS if g in groups}


def evidence_parts(post: KronPosterior, delta: torch.Tensor) -> dict:
    """Per group at prior ``delta`` [L]: parameters, squared distance from the prior mean, effective params."""
    out = {g: {"params": 0, "sq_dist": 0.0, "gamma": 0.0} for g in GROUPS}
    for name, (o, i), lam, sq, d in zip(post.names, post.shapes, post.lam, post.sq_dist(), delta):
        g = out[group_of(name)]
        g["params"] += o * i
        g["sq_dist"] += float(sq)
        g["gamma"] += float((lam / (lam + d)).sum())
    return {g: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()} for g, d in out.items()
            if d["params"]}


def tune_priors(method, res, init_state: dict) -> tuple[KronPosterior, dict, dict]:
    """The posterior (prior 1) and its evidence-tuned priors: scalar, layerwise, and (diagnostic) scalar with
    LoRA A's prior centred at its initialisation. Returns ``(post, {name: delta [L]}, info)``."""
    post = KronPosterior.from_kfac(res, 1.0)
    L = len(post.names)
    post.optimize_marglik(steps=300, lr=0.1)
    d_ml = post.prior_precision.clone()
    ev_grid = [float(post.log_marginal_likelihood(torch.full((L,), g, dtype=torch.float64))) for g in GRID]
    lw = KronPosterior.from_kfac(res, 1.0, "layerwise")
    lw.optimize_marglik(steps=600, lr=0.1)
    ic = KronPosterior.from_kfac(res, 1.0)
    ic.prior_mean = [init_state[lay.name] if "lora_A" in lay.name else m for lay, m in zip(method.layers, ic.prior_mean)]
    ic.optimize_marglik(steps=300, lr=0.1)
    info = {"log_lik": round(res.log_lik, 2), "n_fit": res.n_data, "evidence_grid": [round(v, 2) for v in ev_grid],
            "parts_at_marglik": evidence_parts(post, d_ml),
            "sq_dist_A_from_init": round(float(sum(q for n, q in zip(ic.names, ic.sq_dist()) if "lora_A" in n)), 4),
            "layerwise_prior_by_group": {
                g: round(float(torch.exp(torch.log(lw.prior_precision[[group_of(n) == g for n in post.names]]).mean())), 4)
                for g in GROUPS if any(group_of(n) == g for n in post.names)}}
    return post, {"marglik": d_ml, "marglik_layerwise": lw.prior_precision.clone(),
                  "marglik_A_at_init": ic.prior_precision.clone()}, info


def run_seed(args, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = compose([f"model={args.model}", f"data={args.data}", "method=laplace", "logger=none", "progress_bar=none",
                   f"seed={seed}", f"data.max_train_samples={args.train}", f"data.max_test_samples={args.test}",
                   f"data.max_val_samples={args.val}", *args.override])
    method, dm = setup(cfg)
    bb = method.backbone
    init_state = {lay.name: lay.matrix().double().clone() for lay in method.layers}
    C = bb.num_classes
    print(f"seed {seed}: {args.model} on {args.data}: {len(dm.records['train'])} train / {len(dm.records['val'])} val"
          f" / {len(dm.records['test'])} test, C={C}, {len(method.layers)} posterior layers", flush=True)
    secs = train_map(method, dm, args.epochs, float(cfg.optim.lr), float(cfg.optim.weight_decay),
                     float(cfg.optim.warmup_ratio))
    with torch.no_grad():
        pm, ys = zip(*[(bb.logits(b).softmax(-1), b["labels"]) for b in dm.loader("test")])
    out = {"setup": {"model": args.model, "data": args.data, "seed": seed, "train": len(dm.records["train"]),
                     "val": len(dm.records["val"]), "test": len(dm.records["test"]), "classes": C,
                     "epochs": args.epochs, "map_train_s": round(secs, 1), "grid": GRID},
           "map": quality(torch.cat(pm).double().numpy(), torch.cat(ys).numpy())}
    print(f"  MAP test {out['map']}", flush=True)
    keys = [(a, f) for a in args.approx for f in args.fisher]
    t0 = time.perf_counter()
    results = fit_all(method, dm.loader("train"), keys, int(args.lowrank_threshold))
    out["setup"]["kfac_fit_s_all"] = round(time.perf_counter() - t0, 1)
    posts, priors = {}, {}
    name = {k: k[0] if k[1] == "exact" else f"{k[0]}_{k[1]}" for k in keys}
    ggn, n_ggn = ggn_traces(method, dm.loader("train"), int(args.ggn_batches))
    for k in keys:
        posts[k], priors[k], out[name[k]] = tune_priors(method, results[k], init_state)
        out[name[k]]["trace_ratio_to_ggn"] = trace_ratios(results[k], ggn)
    out["setup"]["ggn_trace_examples"] = n_ggn
    print("  tr(KFAC) / tr(exact GGN) per example, by layer group: "
          + "; ".join(f"{name[k]} {out[name[k]]['trace_ratio_to_ggn']}" for k in keys), flush=True)
    L = len(method.layers)
    grid = torch.tensor(GRID, dtype=torch.float64).unsqueeze(1).expand(len(GRID), L)
    val = logit_variances(method, posts, dm.loader("val"), {k: grid for k in keys})
    rows = {}
    for k in keys:
        f_mu, var, y, mask = val[k]
        val_nll = [float(-torch.log(p.gather(1, y.unsqueeze(1)).clamp(min=1e-12)).mean())
                   for p in probit_probs(f_mu, var, mask)]
        best, at_edge = select_on_grid(GRID, val_nll)
        priors[k]["val_nll"] = torch.full((L,), best, dtype=torch.float64)
        out[name[k]].update(val_nll_grid=[round(v, 4) for v in val_nll], val_best_at_edge=at_edge)
        rows[k] = torch.cat([grid, torch.stack(list(priors[k].values()))])
    test = logit_variances(method, posts, dm.loader("test"), rows)
    for k in keys:
        f_mu, var, y, mask = test[k]
        probs, yn = probit_probs(f_mu, var, mask).numpy(), y.numpy()
        r = out[name[k]]
        r["test_grid"] = [quality(p, yn) for p in probs[:len(GRID)]]
        r["test_best_nll_prior"] = GRID[int(np.argmin([q["nll"] for q in r["test_grid"]]))]
        for j, (pname, d) in enumerate(priors[k].items()):
            r[pname] = {"prior": [round(float(x), 4) for x in (d if pname == "marglik_layerwise" else d[:1])],
                        **quality(probs[len(GRID) + j], yn)}
        print(f"  {name[k]}: " + "; ".join(f"{p} prior {r[p]['prior'][:3]} ECE {r[p]['ece']:.4f} NLL {r[p]['nll']:.4f} "
                                          f"conf {r[p]['conf']:.3f}" for p in priors[k])
              + f"; test-best prior {r['test_best_nll_prior']:.3g}; parts {r['parts_at_marglik']}", flush=True)
    return out


def summary_rows(runs: list[dict]) -> list[str]:
    """One line per (run, KFAC definition): test ECE / NLL / mean confidence at each prior and the priors."""
    lines = []
    for r in runs:
        st, m = r["setup"], r["map"]
        lines.append(f"{st['model']} {st['data']} seed {st['seed']} (C={st['classes']}, {st['train']} train, "
                     f"{st['epochs']} ep): MAP acc {m['acc']:.3f} ECE {100 * m['ece']:.1f}% NLL {m['nll']:.4f} "
                     f"conf {m['conf']:.3f}")
        for key in [k for k in r if isinstance(r[k], dict) and "marglik" in r[k]]:
            x = r[key]
            best = min(x["test_grid"], key=lambda q: q["nll"])
            cells = "  ".join(f"{p}: {x[p]['prior'][0] if p != 'marglik_layerwise' else 'lw':>6} "
                              f"ECE {100 * x[p]['ece']:4.1f}% NLL {x[p]['nll']:.4f} conf {x[p]['conf']:.3f}"
                              for p in ("marglik", "marglik_layerwise", "marglik_A_at_init", "val_nll"))
            lines.append(f"  {key:<22} {cells}  | test-best {x['test_best_nll_prior']:.3g}: ECE "
                         f"{100 * best['ece']:.1f}% NLL {best['nll']:.4f}"
                         + ("  [val best on the grid's edge]" if x.get("val_best_at_edge") else ""))
    return lines


def markdown_rows(runs: list[dict]) -> list[str]:
    """The docs' table: per (run, KFAC definition) test ECE % / NLL / mean confidence of MAP and of the GLM
    probit predictive at the evidence's scalar prior, the layerwise evidence and the validation-NLL prior, and
    the LoRA layers' curvature scale (trace of the KFAC block / trace of the exact GGN, A and B)."""
    def cell(q):
        return f"{100 * q['ece']:.1f} / {q['nll']:.3f} / {q['conf']:.2f}"
    lines = ["| model, data, seed (C, train) | KFAC | MAP | marglik: prior, ECE / NLL / conf | layerwise marglik |"
             " val_nll: prior, ECE / NLL / conf | tr KFAC / tr GGN: A, B |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        st = r["setup"]
        for key in [k for k in r if isinstance(r[k], dict) and "marglik" in r[k]]:
            x, tr = r[key], r[key]["trace_ratio_to_ggn"]
            edge = " (edge)" if x.get("val_best_at_edge") else ""
            lines.append(f"| {st['model']} {st['data']} s{st['seed']} (C={st['classes']}, {st['train']}) | {key} | "
                         f"{cell(r['map'])} | {x['marglik']['prior'][0]:.3g}: {cell(x['marglik'])} | "
                         f"{cell(x['marglik_layerwise'])} | {x['val_nll']['prior'][0]:.3g}{edge}: {cell(x['val_nll'])} | "
                         f"{tr.get('lora_A', float('nan')):.2f}, {tr.get('lora_B', float('nan')):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--approx", nargs="+", default=["reduce", "expand", "expand_sum"])
    ap.add_argument("--fisher", nargs="+", default=["exact"])
    ap.add_argument("--lowrank-threshold", type=int, default=1024)
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. data.max_length=128")
    ap.add_argument("--ggn-batches", type=int, default=4, help="train batches for the exact-GGN trace ratios")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a loaded machine)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="print the summary of finished --out files instead of running")
    ap.add_argument("--markdown", action="store_true", help="with --summarize: the docs' markdown table")
    args = ap.parse_args()
    if args.summarize:
        runs = [r for f in args.summarize for r in json.loads(Path(f).read_text())["runs"]]
        print("\n".join(markdown_rows(runs) if args.markdown else summary_rows(runs)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out and Path(args.out).exists():
        sys.exit(f"error: --out {args.out} exists; choose a new file name")
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        if args.out:
            Path(args.out).write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
