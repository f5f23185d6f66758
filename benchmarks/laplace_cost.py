"""Laplace-LoRA cost and quality on the default model (MiniLM-L6 + LoRA, real SST-2), printed as ratios,
side by side with the laplace-torch library (KronLaplace) on the same MAP model when it is installed:

* fit time (KFAC factors over the train split) relative to one MAP training epoch on the same data
  (target <= 1.5x: one forward + one backward per batch is the floor);
* GLM probit predictive time over the test set relative to one MAP forward pass over it (target <= C + 2);
* posterior memory relative to the number of LoRA (+ head) parameters;
* test ACC / ECE / NLL of MAP, of the Laplace predictive with prior precision 1, tuned by the evidence and
  tuned by the validation NLL (the default, ``method.prior.method=val_nll``: ours on the config's grid, widened
  at its ends; laplace-torch's ``gridsearch`` on the same 17 values, one validation sentence per call), for
  our KFAC-expand (the default, also the peer's) and KFAC-reduce factors, and the agreement of the two
  libraries' predictives (same MAP weights, KFAC-expand both, same prior precision);
* per quality cell, ours - laplace-torch on the same test sentences (paired): the difference and its
  test-set standard error (NLL: of the per-sentence differences; ECE: 200 paired bootstrap resamples).

    python benchmarks/laplace_cost.py [--epochs 15] [--seeds 0 1 2] [--train 1000] [--val 500] [--test 500]
        [--out results.json]

With several seeds (one MAP model each) it also prints mean +- std over seeds and, per quality cell, the paired
difference ours - laplace-torch: its mean, a 95% t-interval over the seeds, the number of seeds on which ours
is at least as good, and a verdict (better / worse: the interval excludes 0; tie: it contains 0).

laplace-torch is not a dependency: ``make bench-laplace`` installs it into a separate venv (.venv-bench)
and runs this script there; without it only our numbers are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import compose  # noqa: E402
from uqlora.core.kfac import fit_kfac  # noqa: E402
from uqlora.core.laplace import KronPosterior  # noqa: E402
from uqlora.metrics import ece as ece_metric  # noqa: E402
from uqlora.metrics import evaluate_predictions  # noqa: E402
from uqlora.models.base import param_groups  # noqa: E402
from uqlora.build import setup  # noqa: E402


def _quality(probs, labels) -> dict:
    m = evaluate_predictions(probs, labels)
    return {k: round(float(m[k]), 4) for k in ("acc", "ece", "nll")}


def train_map(method, dm, epochs: int, lr: float, wd: float) -> list[float]:
    """Plain AdamW MAP training (linear decay), dropout active; returns the seconds of each epoch."""
    bb = method.backbone.train()
    opt = torch.optim.AdamW(param_groups(bb), lr=lr, weight_decay=wd)
    total = epochs * len(dm.loader("train", shuffle=True))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    times = []
    for epoch in range(epochs):
        loader = dm.loader("train", shuffle=True)
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            loss = method.loss(bb.logits(batch), batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"  MAP epoch {epoch + 1}/{epochs}: {times[-1]:.1f} s, last loss {loss.item():.3f}", flush=True)
    bb.eval()
    return times


def map_forward(bb, loader):
    t0 = time.perf_counter()
    probs, labels = [], []
    with torch.no_grad():
        for b in loader:
            probs.append(bb.logits(b).softmax(-1))
            labels.append(b["labels"])
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), time.perf_counter() - t0


def ours_predict(method, loader):
    method.fitted = True  # the posterior was set here, not by the method's own fit
    method.on_predict_start()
    t0 = time.perf_counter()
    with torch.no_grad():
        probs = [method.predictive(b) for b in loader]
    return torch.cat(probs).numpy(), time.perf_counter() - t0


PRIORS = ("prior1", "marglik", "val_nll")
CELLS = [(k, m) for k in PRIORS for m in ("ece", "nll")]
VARIANTS = ("ours_expand", "ours_reduce", "laplace_torch")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(p_ours: np.ndarray, p_peer: np.ndarray, y: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """Ours - peer on the same test sentences: NLL difference with the standard error of the per-sentence
    differences, ECE difference (points of %) with a paired bootstrap standard error."""
    idx = np.arange(len(y))
    d = -np.log(np.clip(p_ours[idx, y], 1e-12, None)) + np.log(np.clip(p_peer[idx, y], 1e-12, None))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(ece_metric(p_ours[i], y[i]) - ece_metric(p_peer[i], y[i]))
    return {"nll": round(float(d.mean()), 5), "nll_se": round(float(d.std(ddof=1) / np.sqrt(len(y))), 5),
            "ece": round(100 * (ece_metric(p_ours, y) - ece_metric(p_peer, y)), 3),
            "ece_se": round(100 * float(np.std(boots, ddof=1)), 3)}


def run_seed(args, seed: int) -> dict:
    """One MAP model (LoRA init, data subsets and order from ``seed``) and every posterior fitted on it."""
    torch.manual_seed(seed)
    cfg = compose([f"model={args.model}", f"data={args.data}", "method=laplace", "logger=none", "progress_bar=none",
                   f"seed={seed}", f"data.max_train_samples={args.train}", f"data.max_test_samples={args.test}",
                   f"data.max_val_samples={args.val}", "method.prior.method=val_nll", "method.prior.search=grid",
                   "method.link=probit",  # the peer's probit predictive is the one compared
                   *([f"method.lowrank_threshold={args.lowrank_threshold}"] if args.lowrank_threshold else []),
                   *([f"method.n_kfac={args.n_kfac}"] if args.n_kfac else [])])
    method, dm = setup(cfg)
    bb = method.backbone
    P = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    C = bb.num_classes
    print(f"seed {seed}: {args.model} + LoRA on {args.data}: {len(dm.records['train'])} train / "
          f"{len(dm.records['val'])} val / {len(dm.records['test'])} test, {P} LoRA+head params, C={C}, "
          f"torch threads {torch.get_num_threads()}",
          flush=True)
    epoch_s = train_map(method, dm, args.epochs, args.lr, float(cfg.optim.weight_decay))
    epoch = float(np.median(epoch_s))
    test = dm.loader("test")
    train = dm.loader("train")
    map_forward(bb, test)  # warm-up
    p_map, y, fwd = map_forward(bb, test)
    out = {"setup": {"model": args.model, "data": args.data, "seed": seed, "train": len(dm.records["train"]),
                     "test": len(dm.records["test"]), "epochs": args.epochs, "params": P, "classes": C},
           "map": {"epoch_s": round(epoch, 3), "forward_test_s": round(fwd, 3), **_quality(p_map, y)}}

    default_approx = str(cfg.method.kfac_approx)
    probs = {}
    for approx in ("expand", "reduce"):  # KFAC-expand (our default, also laplace-torch's) and KFAC-reduce
        t0 = time.perf_counter()
        res = fit_kfac(bb, train, method.layers, lowrank_threshold=int(cfg.method.lowrank_threshold),
                       n_kfac=int(cfg.method.n_kfac), progress=False, approx=approx)
        post = KronPosterior.from_kfac(res, 1.0)
        fit = time.perf_counter() - t0
        method.posterior = post
        q, pred = ours_predict(method, test)
        t0 = time.perf_counter()
        post.optimize_marglik(steps=int(cfg.method.prior.steps), lr=float(cfg.method.prior.lr))
        ml = time.perf_counter() - t0
        p_ml, _ = ours_predict(method, test)
        marglik = {"prior": round(float(post.prior_precision[0]), 4),
                   "log_evidence": round(float(post.log_marginal_likelihood()), 2), **_quality(p_ml, y)}
        t0 = time.perf_counter()
        method.tuning = {}
        method._tune_val_nll(dm, "cpu")  # the method's own val_nll grid search (config grid, widened at its ends)
        vn = time.perf_counter() - t0
        p_vn, _ = ours_predict(method, test)
        out[f"ours_{approx}"] = {
            "fit_s": round(fit, 3), "fit_x_epoch": round(fit / epoch, 3), "marglik_s": round(ml, 3),
            "val_nll_s": round(vn, 3),
            "predict_s": round(pred, 3), "predict_x_forward": round(pred / fwd, 3),
            "memory_x_params": round(post.memory_floats() / P, 3),
            "prior1": _quality(q, y), "marglik": marglik,
            "val_nll": {"prior": round(float(post.prior_precision[0]), 4),
                        "at_edge": method.tuning.get("prior_at_edge"), **_quality(p_vn, y)}}
        probs[f"ours_{approx}"] = {"prior1": q, "marglik": p_ml, "val_nll": p_vn}
        if approx == "expand":
            p1 = q  # the peer's default is KFAC-expand: compare predictives on equal terms
    out["ours"] = out[f"ours_{default_approx}"]

    if args.peer == "auto":
        try:
            from _peer_laplace_torch import batch_chunks, fit_peer, peer_memory_floats, peer_predict

            la, peer_fit = fit_peer(bb, train, prior="fixed", prior_precision=1.0)
            q1, _, peer_pred = peer_predict(la, test, "probit", chunk_size=args.peer_chunk)
            la_ml, _ = fit_peer(bb, train, prior="marglik")
            q_ml, _, _ = peer_predict(la_ml, test, "probit", chunk_size=args.peer_chunk)
            grid = [float(g) for g in cfg.method.prior.grid]
            val1 = [x for b in dm.loader("val") for x in batch_chunks(b, 1)]
            t0 = time.perf_counter()  # the library's grid search, on the same values (its fastest path: batch 1).
            # Its default loss, a torchmetrics RunningNLLMetric, is never reset between grid values (laplace-torch
            # 0.3, utils.validate), so it scores each value by the mean NLL of all values tried so far and picks
            # the grid's last one; a plain function is evaluated afresh for each value.
            la.optimize_prior_precision(pred_type="glm", method="gridsearch", val_loader=val1, link_approx="probit",
                                        loss=lambda p, t: torch.nn.functional.nll_loss(p.clamp(min=1e-12).log(), t),
                                        log_prior_prec_min=float(np.log10(grid[0])),
                                        log_prior_prec_max=float(np.log10(grid[-1])), grid_size=len(grid))
            peer_vn = time.perf_counter() - t0
            q_vn, _, _ = peer_predict(la, test, "probit", chunk_size=args.peer_chunk)
            out["laplace_torch"] = {
                "fit_s": round(peer_fit, 3), "fit_x_epoch": round(peer_fit / epoch, 3),
                "predict_s": round(peer_pred, 3), "predict_x_forward": round(peer_pred / fwd, 3),
                "memory_x_params": round(peer_memory_floats(la) / P, 3), "prior1": _quality(q1, y),
                "marglik": {"prior": round(float(torch.as_tensor(la_ml.prior_precision).flatten()[0]), 4),
                            "log_evidence": round(float(la_ml.log_marginal_likelihood()), 2),
                            **_quality(q_ml, y)},
                "val_nll": {"prior": round(float(torch.as_tensor(la.prior_precision).flatten()[0]), 4),
                            "search_s": round(peer_vn, 3), **_quality(q_vn, y)},
                "agreement_prior1": {"max_abs": round(float(np.abs(q1 - p1).max()), 4),
                                     "mean_abs": round(float(np.abs(q1 - p1).mean()), 5),
                                     "argmax_agree": round(float((q1.argmax(1) == p1.argmax(1)).mean()), 4)}}
            for v, pv in probs.items():  # paired on the same test sentences, with test-set standard errors
                out[v]["minus_peer"] = {key: paired(pv[key], {"prior1": q1, "marglik": q_ml, "val_nll": q_vn}[key], y)
                                        for key in PRIORS}
        except ImportError as e:
            print(f"laplace-torch side skipped: {e}")
    return out


def print_table(out: dict, title: str) -> None:
    rows = [("", "ours expand", "ours reduce", "laplace-torch")]
    lt, ours = out.get("laplace_torch", {}), [out["ours_expand"], out["ours_reduce"]]
    for key, label in (("fit_x_epoch", "fit / MAP epoch"), ("predict_x_forward", "GLM probit predictive / MAP forward"),
                       ("memory_x_params", "posterior floats / LoRA params")):
        rows.append((label, *[f"{o[key]:.2f}x" for o in ours], f"{lt[key]:.2f}x" if key in lt else "-"))
    for key, m in CELLS:
        rows.append((f"test {m.upper()} ({key})", *[f"{o[key][m]:.4f}" for o in ours],
                     f"{lt[key][m]:.4f}" if key in lt else "-"))
    print(f"\n{title}: MAP test ACC {out['map']['acc']:.4f} ECE {out['map']['ece']:.4f} NLL {out['map']['nll']:.4f}; "
          f"epoch {out['map']['epoch_s']:.1f} s, forward over test {out['map']['forward_test_s']:.1f} s")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>12} {r[2]:>12} {r[3]:>14}")
    for v in ("ours_expand", "ours_reduce"):
        if "minus_peer" in out[v]:
            mp = out[v]["minus_peer"]
            print(f"{v} - laplace-torch (test-set s.e.): " + "  ".join(
                f"{key}: ECE {mp[key]['ece']:+.2f} pt ({mp[key]['ece_se']:.2f}), NLL {mp[key]['nll']:+.4f} "
                f"({mp[key]['nll_se']:.4f})" for key in PRIORS))


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std over seeds of every cost ratio and quality cell, and per cell the paired
    difference ours - laplace-torch (negative = ours better) with the number of seeds ours is at least as good."""
    def stats(vals):
        v = np.asarray(vals, dtype=float)
        return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}

    summ = {"seeds": [r["setup"]["seed"] for r in runs], "map": {m: stats([r["map"][m] for r in runs])
                                                                for m in ("acc", "ece", "nll")}}
    for v in VARIANTS:
        if not all(v in r for r in runs):
            continue
        summ[v] = {key: stats([r[v][key] for r in runs]) for key in ("fit_x_epoch", "predict_x_forward",
                                                                      "memory_x_params")}
        for key, m in CELLS:
            summ[v][f"{key}_{m}"] = stats([r[v][key][m] for r in runs])
        summ[v]["marglik_prior"] = stats([r[v]["marglik"]["prior"] for r in runs])
        summ[v]["val_nll_prior"] = stats([r[v]["val_nll"]["prior"] for r in runs])
        if v != "laplace_torch" and all("laplace_torch" in r for r in runs):
            for key, m in CELLS:
                d = [r[v][key][m] - r["laplace_torch"][key][m] for r in runs]
                st, dv = stats(d), np.asarray(d, dtype=float)
                half = T95.get(len(d) - 1, 1.96) * dv.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                lo, hi = dv.mean() - half, dv.mean() + half
                verdict = "better" if hi < 0 else "worse" if lo > 0 else "tie"
                summ[v][f"{key}_{m}_minus_peer"] = {**st, "ci95": [round(float(lo), 5), round(float(hi), 5)],
                                                    "verdict": verdict if len(d) > 1 else "one seed",
                                                    "ours_at_least_as_good": int(sum(x <= 0 for x in d))}
    return summ


def print_summary(summ: dict) -> None:
    n = len(summ["seeds"])
    print(f"\nMean +- sample std over {n} seeds {summ['seeds']} (each: its own MAP model, data subsets and order):")
    print(f"MAP test ACC {summ['map']['acc']['mean']:.4f} ECE {summ['map']['ece']['mean']:.4f} "
          f"NLL {summ['map']['nll']['mean']:.4f}")
    present = [v for v in VARIANTS if v in summ]
    print(f"{'':<40}" + "".join(f"{v.replace('_', ' '):>22}" for v in present))
    for key in ("fit_x_epoch", "predict_x_forward", "memory_x_params"):
        print(f"{key:<40}" + "".join(f"{summ[v][key]['mean']:>15.2f}x +- {summ[v][key]['std']:.2f}" for v in present))
    for key, m in CELLS:
        print(f"{'test ' + m.upper() + ' (' + key + ')':<40}" + "".join(
            f"{summ[v][f'{key}_{m}']['mean']:>14.4f} +- {summ[v][f'{key}_{m}']['std']:.4f}" for v in present))
    for key in ("marglik", "val_nll"):
        print(f"{key + ' prior precision':<40}" + "".join(
            f"{summ[v][key + '_prior']['mean']:>14.2f} +- {summ[v][key + '_prior']['std']:.2f}" for v in present))
    if "laplace_torch" in summ:
        print("\nours - laplace-torch, paired by seed (negative = ours better): mean +- std, 95% t-interval over the "
              "seeds, [seeds where ours is at least as good], verdict:")
        for v in present[:-1]:
            for (key, m) in CELLS:
                c = summ[v][f"{key}_{m}_minus_peer"]
                print(f"{v:<14}{m.upper() + ' ' + key:<14} {c['mean']:+.4f} +- {c['std']:.4f}  "
                      f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]  [{c['ours_at_least_as_good']}/{n}]  {c['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=500, help="validation sentences for the val_nll prior search")
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one MAP model per seed (LoRA init, subsets, data order); >1 adds a mean/paired summary")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--peer", choices=("auto", "off"), default="auto")
    ap.add_argument("--peer-chunk", type=int, default=1, help="laplace-torch predictive chunk (its B^2 Jacobian)")
    ap.add_argument("--lowrank-threshold", type=int, default=None, help="method.lowrank_threshold (default: config)")
    ap.add_argument("--n-kfac", type=int, default=None, help="method.n_kfac (default: config)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.out and Path(args.out).exists():  # never overwrite another run's results
        sys.exit(f"error: --out {args.out} exists (another run's results); choose a new file name")
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        print(json.dumps(runs[-1], indent=1))
        print_table(runs[-1], f"seed {seed}")
        if args.out:  # written after every seed, so a long run keeps what it measured
            Path(args.out).write_text(json.dumps({"runs": runs}, indent=1))
    result = {"runs": runs}
    if len(runs) > 1:
        result["summary"] = summarize(runs)
        print_summary(result["summary"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
