"""Laplace-LoRA cost and quality on the default model (MiniLM-L6 + LoRA, real SST-2), printed as ratios,
side by side with the laplace-torch library (KronLaplace) on the same MAP model when it is installed:

* fit time (KFAC factors over the train split) relative to one MAP training epoch on the same data
  (target <= 1.5x: one forward + one backward per batch is the floor);
* GLM probit predictive time over the test set relative to one MAP forward pass over it (target <= C + 2);
* posterior memory relative to the number of LoRA (+ head) parameters;
* test ACC / ECE / NLL of MAP, of the Laplace predictive with prior precision 1 and tuned by the evidence,
  for our KFAC-reduce (default) and KFAC-expand (the peer's) factors, and the agreement of the two
  libraries' predictives (same MAP weights, KFAC-expand both, same prior precision).

    python benchmarks/laplace_cost.py [--epochs 15] [--train 1000] [--test 500] [--out results.json]

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
from uqlora.metrics import evaluate_predictions  # noqa: E402
from uqlora.pipeline import setup  # noqa: E402


def _quality(probs, labels) -> dict:
    m = evaluate_predictions(probs, labels)
    return {k: round(float(m[k]), 4) for k in ("acc", "ece", "nll")}


def train_map(method, dm, epochs: int, lr: float, wd: float) -> list[float]:
    """Plain AdamW MAP training (linear decay), dropout active; returns the seconds of each epoch."""
    bb = method.backbone.train()
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
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
    method.on_predict_start()
    t0 = time.perf_counter()
    with torch.no_grad():
        probs = [method.predictive(b) for b in loader]
    return torch.cat(probs).numpy(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--peer", choices=("auto", "off"), default="auto")
    ap.add_argument("--peer-chunk", type=int, default=1, help="laplace-torch predictive chunk (its B^2 Jacobian)")
    ap.add_argument("--lowrank-threshold", type=int, default=None, help="method.lowrank_threshold (default: config)")
    ap.add_argument("--n-kfac", type=int, default=None, help="method.n_kfac (default: config)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = compose([f"model={args.model}", f"data={args.data}", "method=laplace", "logger=none", "progress_bar=none",
                   f"data.max_train_samples={args.train}", f"data.max_test_samples={args.test}",
                   *([f"method.lowrank_threshold={args.lowrank_threshold}"] if args.lowrank_threshold else []),
                   *([f"method.n_kfac={args.n_kfac}"] if args.n_kfac else [])])
    method, dm = setup(cfg)
    bb = method.backbone
    P = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    C = bb.num_classes
    print(f"{args.model} + LoRA on {args.data}: {len(dm.records['train'])} train / {len(dm.records['test'])} test, "
          f"{P} LoRA+head params, C={C}, torch threads {torch.get_num_threads()}", flush=True)
    epoch_s = train_map(method, dm, args.epochs, args.lr, float(cfg.optim.weight_decay))
    epoch = float(np.median(epoch_s))
    test = dm.loader("test")
    train = dm.loader("train")
    map_forward(bb, test)  # warm-up
    p_map, y, fwd = map_forward(bb, test)
    out = {"setup": {"model": args.model, "data": args.data, "train": len(dm.records["train"]),
                     "test": len(dm.records["test"]), "epochs": args.epochs, "params": P, "classes": C},
           "map": {"epoch_s": round(epoch, 3), "forward_test_s": round(fwd, 3), **_quality(p_map, y)}}

    default_approx = str(cfg.method.kfac_approx)
    for approx in ("reduce", "expand"):  # KFAC-reduce (our default) and KFAC-expand (laplace-torch's)
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
        p_ml, pred_ml = ours_predict(method, test)
        out[f"ours_{approx}"] = {
            "fit_s": round(fit, 3), "fit_x_epoch": round(fit / epoch, 3), "marglik_s": round(ml, 3),
            "predict_s": round(pred, 3), "predict_x_forward": round(pred / fwd, 3),
            "memory_x_params": round(post.memory_floats() / P, 3),
            "prior1": _quality(q, y), "marglik": {"prior": round(float(post.prior_precision[0]), 4),
                                                  **_quality(p_ml, y)}}
        if approx == "expand":
            p1 = q  # the peer's default is KFAC-expand: compare predictives on equal terms
    out["ours"] = out[f"ours_{default_approx}"]

    if args.peer == "auto":
        try:
            from _peer_laplace_torch import fit_peer, peer_memory_floats, peer_predict

            la, peer_fit = fit_peer(bb, train, prior="fixed", prior_precision=1.0)
            q1, _, peer_pred = peer_predict(la, test, "probit", chunk_size=args.peer_chunk)
            la_ml, peer_fit_ml = fit_peer(bb, train, prior="marglik")
            q_ml, _, _ = peer_predict(la_ml, test, "probit", chunk_size=args.peer_chunk)
            out["laplace_torch"] = {
                "fit_s": round(peer_fit, 3), "fit_x_epoch": round(peer_fit / epoch, 3),
                "predict_s": round(peer_pred, 3), "predict_x_forward": round(peer_pred / fwd, 3),
                "memory_x_params": round(peer_memory_floats(la) / P, 3), "prior1": _quality(q1, y),
                "marglik": {"prior": round(float(torch.as_tensor(la_ml.prior_precision).flatten()[0]), 4),
                            **_quality(q_ml, y)},
                "agreement_prior1": {"max_abs": round(float(np.abs(q1 - p1).max()), 4),
                                     "mean_abs": round(float(np.abs(q1 - p1).mean()), 5),
                                     "argmax_agree": round(float((q1.argmax(1) == p1.argmax(1)).mean()), 4)}}
        except ImportError as e:
            print(f"laplace-torch side skipped: {e}")
    print(json.dumps(out, indent=1))
    rows = [("", "ours reduce", "ours expand", "laplace-torch")]
    lt, ours = out.get("laplace_torch", {}), [out["ours_reduce"], out["ours_expand"]]
    for key, label in (("fit_x_epoch", "fit / MAP epoch"), ("predict_x_forward", "GLM probit predictive / MAP forward"),
                       ("memory_x_params", "posterior floats / LoRA params")):
        rows.append((label, *[f"{o[key]:.2f}x" for o in ours], f"{lt[key]:.2f}x" if key in lt else "-"))
    for key in ("prior1", "marglik"):
        for m in ("ece", "nll"):
            rows.append((f"test {m.upper()} ({key})", *[f"{o[key][m]:.4f}" for o in ours],
                         f"{lt[key][m]:.4f}" if key in lt else "-"))
    print(f"\nMAP: test ACC {out['map']['acc']:.4f} ECE {out['map']['ece']:.4f} NLL {out['map']['nll']:.4f}; "
          f"epoch {epoch:.1f} s, forward over test {fwd:.1f} s")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>12} {r[2]:>12} {r[3]:>14}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
