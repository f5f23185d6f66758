"""SWAG-LoRA cost on the default model (MiniLM-L6 + LoRA, real SST-2 batches), printed as ratios:

* per-step time of the SWAG phase (a training step plus the snapshot, every ``collect_every`` steps)
  relative to a plain MAP step (target: overhead <= 5%);
* the SWAG state's memory relative to the LoRA (+ head) parameters (expect K + 2);
* the predictive's time (S weight draws) relative to one MAP forward pass (expect ~S).

    python benchmarks/swag_overhead.py [--model minilm] [--steps 40] [--collect-every 10] [--samples 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from conftest import compose  # noqa: E402
from uqlora.callbacks.swag import swag_parameters  # noqa: E402
from uqlora.core.swag import SWAG, assign, flatten  # noqa: E402
from uqlora.build import setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--collect-every", type=int, default=10)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--max-rank", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = compose([f"model={args.model}", f"data={args.data}", "logger=none"])
    method, dm = setup(cfg)
    bb = method.backbone.train()
    params = [p for _, p in swag_parameters(bb, "all")]
    P = sum(p.numel() for p in params)
    swag = SWAG(P, max_rank=args.max_rank)
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = [b for _, b in zip(range(args.steps), dm.loader("train", shuffle=True))]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.precision == "bf16-mixed")

    def step(b, collect: bool) -> float:
        t0 = time.perf_counter()
        with autocast:
            loss = method.loss(bb.logits(b), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if collect:
            swag.collect(flatten(params))
        return time.perf_counter() - t0

    for b in batches[:3]:  # warm-up
        step(b, False)
    map_t, swag_t = [], []
    for i, b in enumerate(batches):  # interleave so both see the same batches and machine state
        map_t.append(step(b, False))
        swag_t.append(step(b, (i + 1) % args.collect_every == 0))
    t_map, t_swag = statistics.mean(map_t), statistics.mean(swag_t)

    bb.eval()
    test = next(iter(dm.loader("test")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), autocast:
        bb.logits(test)
        t0 = time.perf_counter()
        for _ in range(3):
            bb.logits(test)
        t_fwd = (time.perf_counter() - t0) / 3
        draws = [swag.sample(1.0, generator=g) for _ in range(args.samples)]
        t0 = time.perf_counter()
        for d in draws:
            assign(params, d)
            bb.logits(test).softmax(-1)
        t_pred = time.perf_counter() - t0
    mem = swag.memory_bytes() / (P * swag.mean.element_size())
    print(f"model={args.model} data={args.data} LoRA(+head) params P={P} K={args.max_rank} S={args.samples} "
          f"collect_every={args.collect_every} steps={args.steps}")
    print(f"MAP step {1000 * t_map:.1f} ms | SWAG-phase step {1000 * t_swag:.1f} ms | "
          f"overhead {100 * (t_swag / t_map - 1):+.2f}% (target <= 5%)")
    print(f"SWAG state memory / LoRA params = {mem:.2f} (expect K + 2 = {args.max_rank + 2})")
    print(f"predictive ({args.samples} draws) / one MAP forward = {t_pred / t_fwd:.2f} (expect ~S = {args.samples}); "
          f"batch of {test['labels'].shape[0]}: forward {1000 * t_fwd:.1f} ms")


if __name__ == "__main__":
    main()
