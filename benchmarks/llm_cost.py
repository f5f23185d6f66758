"""Cost of the causal-LM path on SmolLM2-135M (real weights), printed as ratios; every measurement in a fresh
subprocess (so its peak RSS is its own):

1. the cloze head's two paths on ARC-Easy at batch 8 (``model.cloze_impl=separate``: one sequence per choice,
   the old path; ``packed``: the context once per question): tokens processed per training step and per 100
   scored questions, seconds per training step (forward + backward + AdamW, dropout on, the model's autocast),
   seconds per 100 scored questions (evaluation batches in data order, and grouped by length as the loaders
   now do), peak RSS, and the max |difference| of the choice log-likelihoods (fp32; argmax and probabilities
   under bf16 autocast);
2. every method relative to MAP on the same data, ARC-Easy (cloze) and SST-2 (label words) side by side:
   training time per epoch / one MAP epoch, post-hoc fit time / one MAP epoch, test-time cost / one MAP test
   pass, extra floats stored (the method's saved state) / LoRA (+ head) parameters, peak RSS / MAP's. Each
   method runs through the project's own code: ``build.setup``, Lightning ``fit`` for one epoch (the
   method's callbacks included), ``method.posthoc_fit`` on the MAP adapter, ``predict.predict`` on test.
   Ensembles are their members' costs times M (members run one after another). A method added later is one
   line of ``METHODS``.

    python benchmarks/llm_cost.py [--quick] [--datasets arc_e sst2] [--methods map laplace ...] [--threads N]
                                  [--clock wall|cpu] [--model smollm2_135m] [--out FILE]

On a machine shared with other jobs, wall-clock seconds of a multi-threaded process measure mostly the time its
threads wait for each other (a parallel op ends when its last thread is scheduled): there, run with
``--threads 1 --clock cpu``.

Targets (printed as met / not met): cloze training step and scoring >= 3x faster than the separate path;
Laplace-LoRA on the cloze head: KFAC fit <= 1.5x one MAP epoch, GLM predictive <= (C + 2)x a MAP test pass;
peak RSS of the packed path <= the separate path's. ``--quick`` shrinks every size for a smoke test (its
numbers mean nothing). Results go to a new time-stamped JSON under benchmarks/results/ (never overwritten).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODEL = "smollm2_135m"
DATASETS = {"arc_e": "cloze", "sst2": "label words"}


@dataclass
class Spec:
    """One row of the cost table. ``stage``: ``trained`` (its own training epoch), ``posthoc`` (fitted on the
    MAP row's adapter), ``members`` (``base``'s row times its config's ``num_models``)."""

    name: str
    overrides: tuple = ()
    stage: str = "trained"
    base: str = ""
    quick: tuple = ()  # extra overrides under --quick
    notes: str = ""


SAMPLES_QUICK = ("method.num_samples=2",)
METHODS = [
    Spec("map", ("method=map",)),
    Spec("mc_dropout", ("method=mc_dropout",), quick=SAMPLES_QUICK),
    Spec("swag", ("method=swag", "method.reload_best=false", "method.collect_every=2"),
         quick=SAMPLES_QUICK + ("method.collect_every=1", "method.start=1")),
    Spec("laplace", ("method=laplace",), "posthoc"),
    Spec("laplace_ll", ("method=laplace_ll",), "posthoc"),
    Spec("temperature", ("method=temperature",), "posthoc"),
    Spec("adue", ("method=adue",), "posthoc", quick=("method.grid.lr=[1e-3]", "method.grid.alpha_reg=[0.1]",
                                                     "method.grid.alpha_l2sp=[0.1]", "method.epochs=2")),
    Spec("blob", ("method=blob",), quick=SAMPLES_QUICK),
    Spec("scalabl", ("method=scalabl",), quick=SAMPLES_QUICK),
    Spec("tfb", ("method=tfb",), "posthoc", quick=SAMPLES_QUICK + ("method.search_iters=2", "method.search_samples=2",
                                                                  "method.anchor_size=8")),
    Spec("ensemble", ("method=ensemble",), "members", base="map"),
    Spec("multiswag", ("method=multiswag",), "members", base="swag"),
]
SIZES = {  # questions / sentences per split; cloze: training steps timed and questions scored at batch 8
    "full": {"train": 64, "val": 32, "calib": 32, "test": 64, "eval_bs": 32, "cloze_steps": 6, "cloze_score": 64,
             "parity": 64},
    "quick": {"train": 16, "val": 8, "calib": 8, "test": 16, "eval_bs": 8, "cloze_steps": 2, "cloze_score": 16,
              "parity": 8},
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compose(overrides):
    from conftest import compose

    return compose(["logger=none", "progress_bar=none", "print_table=false", f"model={MODEL}", *overrides])


def _threads() -> None:
    import torch

    if os.environ.get("LLM_COST_THREADS"):
        torch.set_num_threads(int(os.environ["LLM_COST_THREADS"]))


def now() -> float:
    """The workers' clock: wall seconds, or (``--clock cpu``) the process's CPU seconds, all threads summed --
    on a machine shared with other jobs the latter does not count the time the process waits for a core."""
    return time.process_time() if os.environ.get("LLM_COST_CLOCK") == "cpu" else time.perf_counter()


def _floats(obj) -> int:
    """Floats held by the tensors of a (nested) state dict."""
    import torch

    if torch.is_tensor(obj):
        return obj.numel() if obj.is_floating_point() else 0
    if isinstance(obj, dict):
        return sum(_floats(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_floats(v) for v in obj)
    return 0


# --- workers (each runs in its own subprocess) ------------------------------------------------------------------
def work_cloze(job: dict) -> dict:
    """Training steps and scoring of one cloze path at batch 8."""
    import torch

    from uqlora.build import setup

    n = job["sizes"]
    cfg = _compose(["data=arc_e", f"model.cloze_impl={job['impl']}", "data.batch_size=8", "data.eval_batch_size=8",
                    f"data.max_train_samples={8 * (n['cloze_steps'] + 1)}",
                    f"data.max_test_samples={n['cloze_score']}"])
    torch.manual_seed(0)
    method, dm = setup(cfg)
    bb, rss_model = method.backbone, maxrss_mb()
    autocast = method.autocast(torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=1e-4)
    bb.train()
    steps, tokens, real = [], 0, 0
    for i, batch in enumerate(dm.loader("train", shuffle=True)):
        t0 = now()
        with autocast:
            loss = method.loss(bb.logits(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            steps.append(now() - t0)
            tokens += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
    bb.eval()
    out = {"impl": job["impl"], "step_s": sorted(steps)[len(steps) // 2], "steps_timed": len(steps),
           "train_tokens_per_step": tokens / len(steps), "train_real_tokens_per_step": real / len(steps)}
    nq = len(dm.records["test"])
    for grouped in (False, True):
        t0, tok = now(), 0
        with torch.no_grad(), autocast:
            for batch in dm.loader("test", group_by_length=grouped):
                bb.logits(batch)
                tok += batch["input_ids"].numel()
        key = "grouped" if grouped else "ungrouped"
        out[f"score_s_per_100_{key}"] = (now() - t0) * 100 / nq
        out[f"score_tokens_per_100_{key}"] = tok * 100 / nq
    out.update(rss_model_mb=rss_model, peak_rss_mb=maxrss_mb())
    return out


def work_parity(job: dict) -> dict:
    """Both paths' choice log-likelihoods on the same questions: fp32, and under bf16 autocast."""
    import torch

    from uqlora.data.prompts import Collator
    from uqlora.build import setup

    cfg = _compose(["data=arc_e", f"data.max_test_samples={job['sizes']['parity']}"])
    method, dm = setup(cfg)
    bb = method.backbone.eval()
    recs, C = dm.records["test"], bb.num_classes
    out = {"questions": len(recs)}
    for name, ctx in (("fp32", contextlib.nullcontext), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        got = {}
        for impl in ("packed", "separate"):
            bb.impl = impl
            col = Collator(dm.collator.tok, "lm_cloze", "multiple_choice", C, int(cfg.data.max_length), cloze_impl=impl)
            rows = []
            with torch.no_grad(), ctx():
                for i in range(0, len(recs), 8):
                    batch = col(recs[i:i + 8])
                    h = bb._hidden(batch)
                    bb.norm = "none"
                    raw = bb._scores(h, batch)
                    bb.norm = str(cfg.model.cloze_norm)
                    rows.append((raw, bb._scores(h, batch), batch["choice_mask"]))
            got[impl] = [torch.cat(x) for x in zip(*rows)]
        (raw_p, z_p, m), (raw_s, z_s, _) = got["packed"], got["separate"]
        p_p, p_s = z_p.softmax(-1), z_s.softmax(-1)
        out[name] = {"max_abs_loglik": float((raw_p - raw_s)[m].abs().max()),
                     "max_abs_logit": float((z_p - z_s)[m].abs().max()),
                     "max_abs_prob": float((p_p - p_s).abs().max()),
                     "argmax_agree": float((p_p.argmax(-1) == p_s.argmax(-1)).float().mean())}
    return out


def work_method(job: dict) -> dict:
    """One method on one dataset: [its training epoch], post-hoc fit, test predictive; timings, state size, RSS."""
    import numpy as np
    import torch

    import uqlora.methods.laplace as laplace_module
    from uqlora.build import build_trainer, setup
    from uqlora.predict import predict

    n, spec = job["sizes"], job["spec"]
    cfg = _compose([f"data={job['data']}", f"data.max_train_samples={n['train']}", f"data.max_val_samples={n['val']}",
                    f"data.max_calib_samples={n['calib']}", f"data.max_test_samples={n['test']}", "data.batch_size=8",
                    f"data.eval_batch_size={n['eval_bs']}", "trainer.max_epochs=1", "+trainer.limit_val_batches=0",
                    *spec["overrides"]])
    torch.manual_seed(0)
    method, dm = setup(cfg)
    bb = method.backbone
    P = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    out = {"method": spec["name"], "data": job["data"], "lora_params": P, "classes": bb.num_classes,
           "train_n": len(dm.records["train"]), "test_n": len(dm.records["test"]), "rss_model_mb": maxrss_mb(),
           "load_before": os.getloadavg()[0]}
    kfac_s = []
    fit_kfac = laplace_module.fit_kfac

    def timed_fit_kfac(*a, **kw):  # the KFAC part of Laplace's post-hoc fit
        t0 = now()
        try:
            return fit_kfac(*a, **kw)
        finally:
            kfac_s.append(now() - t0)

    laplace_module.fit_kfac = timed_fit_kfac
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "checkpoints").mkdir()
        if spec["stage"] == "posthoc":
            bb.load_trainable_state_dict(torch.load(job["adapter"], weights_only=True, map_location="cpu"))
            method.trains = False
        else:
            method.prepare_fit(dm)
            n_batches = -(-len(dm.records["train"]) // 8)
            trainer = build_trainer(cfg, run, False, method.extra_callbacks(run), n_train_batches=n_batches)
            t0 = now()
            trainer.fit(method, datamodule=dm)
            out["train_s"] = now() - t0
            if job.get("save_adapter"):
                torch.save(bb.trainable_state_dict(), job["save_adapter"])
        t0 = now()
        method.posthoc_fit(dm)
        out["posthoc_s"] = now() - t0
        if kfac_s:
            out["kfac_s"] = sum(kfac_s)
        trainer = build_trainer(cfg, run, False, [])
        t0 = now()
        res = predict(trainer, method, dm, "test")
        out["test_s"] = now() - t0
    out.update(acc=float(np.mean(res["probs"].argmax(1) == res["labels"])),
               state_floats=_floats(method.method_state_dict()), peak_rss_mb=maxrss_mb(),
               load_after=os.getloadavg()[0])
    return out


WORKERS = {"cloze": work_cloze, "parity": work_parity, "method": work_method}


def run_worker(job: dict) -> dict:
    """``job`` in a fresh Python process; its result (the last stdout line)."""
    t0 = time.perf_counter()
    job = {**job, "model": MODEL}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep +
                                      os.environ.get("PYTHONPATH", "")})
    if p.returncode != 0:
        sys.exit(f"error: worker {job['kind']} {job.get('impl') or job.get('spec', {}).get('name', '')} failed:\n"
                 + p.stderr[-4000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


# --- the two tables ---------------------------------------------------------------------------------------------
def cloze_table(sizes: dict) -> dict:
    res = {impl: run_worker({"kind": "cloze", "impl": impl, "sizes": sizes}) for impl in ("separate", "packed")}
    res["parity"] = run_worker({"kind": "parity", "sizes": sizes})
    s, p = res["separate"], res["packed"]
    res["ratios"] = {"train_step": s["step_s"] / p["step_s"],
                     "score": s["score_s_per_100_ungrouped"] / p["score_s_per_100_grouped"],
                     "score_packing_only": s["score_s_per_100_ungrouped"] / p["score_s_per_100_ungrouped"],
                     "train_tokens": s["train_tokens_per_step"] / p["train_tokens_per_step"],
                     "score_tokens": s["score_tokens_per_100_ungrouped"] / p["score_tokens_per_100_grouped"],
                     "peak_rss": p["peak_rss_mb"] / s["peak_rss_mb"]}
    return res


def print_cloze(res: dict) -> None:
    s, p, r, par = res["separate"], res["packed"], res["ratios"], res["parity"]
    print(f"\n1. lm_cloze on ARC-Easy, {MODEL}, batch 8 ({s['steps_timed']} training steps timed, median; "
          f"scores per 100 questions)")
    rows = [("tokens per training step (padded / real)", f"{s['train_tokens_per_step']:.0f} / "
             f"{s['train_real_tokens_per_step']:.0f}", f"{p['train_tokens_per_step']:.0f} / "
             f"{p['train_real_tokens_per_step']:.0f}", f"{r['train_tokens']:.2f}x fewer"),
            ("s per training step", f"{s['step_s']:.2f}", f"{p['step_s']:.2f}", f"{r['train_step']:.2f}x"),
            ("tokens per 100 questions (data order)", f"{s['score_tokens_per_100_ungrouped']:.0f}",
             f"{p['score_tokens_per_100_ungrouped']:.0f}", ""),
            ("tokens per 100 questions (grouped)", f"{s['score_tokens_per_100_grouped']:.0f}",
             f"{p['score_tokens_per_100_grouped']:.0f}", f"{r['score_tokens']:.2f}x fewer (old order vs new)"),
            ("s per 100 questions (data order)", f"{s['score_s_per_100_ungrouped']:.1f}",
             f"{p['score_s_per_100_ungrouped']:.1f}", f"{r['score_packing_only']:.2f}x (packing alone)"),
            ("s per 100 questions (grouped)", f"{s['score_s_per_100_grouped']:.1f}",
             f"{p['score_s_per_100_grouped']:.1f}", f"{r['score']:.2f}x (old: separate in data order)"),
            ("peak RSS MB (model loaded: MB)", f"{s['peak_rss_mb']:.0f} ({s['rss_model_mb']:.0f})",
             f"{p['peak_rss_mb']:.0f} ({p['rss_model_mb']:.0f})", f"{r['peak_rss']:.2f}x")]
    print(f"{'':<42}{'separate (old)':>18}{'packed (new)':>18}   new vs old")
    for row in rows:
        print(f"{row[0]:<42}{row[1]:>18}{row[2]:>18}   {row[3]}")
    print(f"choice log-likelihoods on {par['questions']} questions, packed vs separate: fp32 max |diff| "
          f"{par['fp32']['max_abs_loglik']:.2e} (per-char logits {par['fp32']['max_abs_logit']:.2e}, argmax agree "
          f"{par['fp32']['argmax_agree']:.3f}); bf16 autocast: max |prob diff| {par['bf16']['max_abs_prob']:.2e}, "
          f"argmax agree {par['bf16']['argmax_agree']:.3f}")


def cost_table(sizes: dict, datasets: list[str], names: list[str], quick: bool) -> dict:
    specs = {s.name: s for s in METHODS}
    out = {}
    for data in datasets:
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            adapter = str(Path(tmp) / "map_adapter.pt")
            for name in ["map"] + [m for m in names if m != "map"]:
                spec = specs[name]
                if spec.stage == "members":
                    continue
                job = {"kind": "method", "data": data, "sizes": sizes, "adapter": adapter,
                       "spec": {"name": name, "stage": spec.stage,
                                "overrides": list(spec.overrides) + (list(spec.quick) if quick else [])}}
                if name == "map":
                    job["save_adapter"] = adapter
                rows[name] = run_worker(job)
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
                print(f"  {data} {name}: {json.dumps(shown)}", flush=True)
        out[data] = {"rows": rows, "ratios": ratios(rows, names, specs)}
    return out


def ratios(rows: dict, names: list[str], specs: dict) -> dict:
    from conftest import compose

    m = rows["map"]
    epoch, test, P, peak = m["train_s"], m["test_s"], m["lora_params"], m["peak_rss_mb"]
    out = {}
    for name in names:
        spec = specs[name]
        if spec.stage == "members":
            if spec.base not in out:
                continue
            M = int(compose([f"method={name}"]).method.num_models)
            b = out[spec.base]
            out[name] = {"train_x_epoch": M * b["train_x_epoch"], "posthoc_x_epoch": M * b["posthoc_x_epoch"],
                         "test_x_pass": M * b["test_x_pass"], "extra_x_params": M * (1 + b["extra_x_params"]) - 1,
                         "peak_x_map": b["peak_x_map"], "how": f"{M} x {spec.base} (members one after another)"}
            continue
        r = rows[name]
        out[name] = {"train_x_epoch": r["train_s"] / epoch if "train_s" in r else 1.0,
                     "posthoc_x_epoch": r["posthoc_s"] / epoch, "test_x_pass": r["test_s"] / test,
                     "extra_x_params": r["state_floats"] / P,
                     "peak_x_map": max(r["peak_rss_mb"], peak if spec.stage == "posthoc" else 0) / peak,
                     "how": "measured" if spec.stage == "trained" else "measured on the MAP adapter (training = MAP's)"}
        if "kfac_s" in r:
            out[name]["kfac_x_epoch"] = r["kfac_s"] / epoch
    return out


def print_costs(res: dict, names: list[str]) -> None:
    datasets = list(res)
    cols = (("train_x_epoch", "train/epoch"), ("posthoc_x_epoch", "post-hoc/epoch"), ("test_x_pass", "test/pass"),
            ("extra_x_params", "floats/params"), ("peak_x_map", "peak RSS"))
    print(f"\n2. cost relative to MAP ({MODEL}; " + ", ".join(
        f"{d} ({DATASETS[d]}): {res[d]['rows']['map']['train_n']} train, {res[d]['rows']['map']['test_n']} test, "
        f"MAP epoch {res[d]['rows']['map']['train_s']:.1f} s, test pass {res[d]['rows']['map']['test_s']:.1f} s"
        for d in datasets) + ")")
    print(f"{'method':<13}" + "".join(f"{label:>{15 * len(datasets) + 2}}" for _, label in cols))
    print(f"{'':<13}" + "".join("  " + "".join(f"{d:>15}" for d in datasets) for _ in cols))
    for name in names:
        cells = []
        for key, _ in cols:
            cells.append("  " + "".join(f"{res[d]['ratios'][name][key]:>14.2f}x" if name in res[d]["ratios"]
                                        else f"{'-':>15}" for d in datasets))
        print(f"{name:<13}" + "".join(cells))
    print("post-hoc rows (laplace, laplace_ll, temperature, adue) train as MAP; their peak RSS is the larger of MAP's "
          "and their own stages'; ensemble / multiswag = M x their member row; floats = the method's saved state")


def targets(cloze: dict | None, costs: dict) -> list[tuple[str, float, float, bool]]:
    out = []
    if cloze:
        r = cloze["ratios"]
        out += [("cloze training step speed-up (>= 3x)", r["train_step"], 3.0, r["train_step"] >= 3.0),
                ("cloze scoring speed-up (>= 3x)", r["score"], 3.0, r["score"] >= 3.0),
                ("packed peak RSS / separate (<= 1)", r["peak_rss"], 1.0, r["peak_rss"] <= 1.0)]
    lap = costs.get("arc_e", {}).get("ratios", {}).get("laplace")
    if lap:
        C = costs["arc_e"]["rows"]["map"]["classes"]
        out += [("Laplace KFAC fit / MAP epoch, cloze (<= 1.5x)", lap["kfac_x_epoch"], 1.5, lap["kfac_x_epoch"] <= 1.5),
                (f"Laplace GLM predictive / MAP test pass, cloze (<= C+2 = {C + 2}x)", lap["test_x_pass"], C + 2.0,
                 lap["test_x_pass"] <= C + 2)]
    return out


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=[s.name for s in METHODS], choices=[s.name for s in METHODS])
    ap.add_argument("--skip-cloze", action="store_true", help="only the cost table")
    ap.add_argument("--model", default=MODEL, help="conf/model name (tiny_llama: a fast check of the code paths)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="seconds measured: wall clock, or the worker's CPU time (a shared machine: with --threads 1)")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/llm_cost_<time>.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        MODEL = job["model"]
        _threads()
        print(json.dumps(WORKERS[job["kind"]](job)))
        return
    MODEL = args.model
    if args.threads:
        os.environ["LLM_COST_THREADS"] = str(args.threads)
    os.environ["LLM_COST_CLOCK"] = args.clock
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name = f"llm_cost{'_quick' if args.quick else ''}_{stamp}.json"
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / name)
    if out_path.exists():  # never overwrite another run's results
        sys.exit(f"error: --out {out_path} exists (another run's results); choose a new file name")
    sizes = SIZES["quick" if args.quick else "full"]
    names = ["map"] + [m for m in args.methods if m != "map"]
    t0 = time.perf_counter()
    import torch

    result = {"model": MODEL, "quick": args.quick, "sizes": sizes, "started": stamp, "cpus": os.cpu_count(),
              "threads": args.threads or torch.get_num_threads(), "clock": args.clock, "load_at_start": os.getloadavg()}
    cloze = None
    if not args.skip_cloze:
        cloze = result["cloze"] = cloze_table(sizes)
        print_cloze(cloze)
    result["costs"] = cost_table(sizes, args.datasets, names, args.quick)
    print_costs(result["costs"], names)
    result["targets"] = [{"target": t, "measured": round(v, 3), "bound": b, "met": ok}
                         for t, v, b, ok in targets(cloze, result["costs"])]
    print("\ntargets" + (" (--quick: sizes too small to mean anything)" if args.quick else "") + ":")
    for t in result["targets"]:
        print(f"  {t['target']:<58} {t['measured']:>7.2f}  {'met' if t['met'] else 'NOT met'}")
    result.update(load_at_end=os.getloadavg(), total_s=round(time.perf_counter() - t0, 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"\n{result['total_s']:.0f} s; seconds above: {args.clock} clock, {result['threads']} torch thread(s) per "
          f"worker; load average at start {result['load_at_start'][0]:.1f}, at end {result['load_at_end'][0]:.1f} "
          f"({result['cpus']} CPUs); wrote {out_path}")


if __name__ == "__main__":
    main()
