"""Each method against a reference method (MAP by default) on the same test examples, with the test-set noise.

One seed cannot say whether a method changed ECE or NLL "beyond noise"; the test examples can. For every
(model, data, seed) cell that holds a run of the reference method, each other method's run is compared on the
examples both predicted (matched by id): the difference in accuracy and NLL with the standard error of the
per-example differences, the difference in ECE with a paired bootstrap standard error (the same resampled
examples for both runs), and a verdict -- ``better`` / ``worse`` when the difference is more than two standard
errors from zero, ``tie`` otherwise. Rows: ``paired.md`` of ``make tables`` (``--vs``), and
:func:`paired_rows` for notebooks.

Runs that save error-detection scores with their predictions (``u_<score>``: AdUE runs) are also compared within
the run: each score's error-detection ROC-AUC minus the softmax response's on the same predictions, with a paired
bootstrap standard error (:func:`errdet_rows`; the second section of ``paired.md``).
"""
from __future__ import annotations

import numpy as np

from uqlora.results.collect import Run, split_runs
from uqlora.results.names import SCORE_NAMES, method_names, method_order, score_order
from uqlora.rundir import RunDir

METRICS = ("acc", "ece", "nll")
LOWER_IS_BETTER = {"acc": False, "ece": True, "nll": True, "errdet_auroc": False}


def _predictions(run: Run, split: str) -> dict | None:
    if run.path is None or not RunDir(run.path).predictions_path(split).is_file():
        return None
    p = RunDir(run.path).predictions(split)
    return p if "probs" in p and "labels" in p and "ids" in p else None  # generation runs have no class probs


def _align(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs of a, probs of b, labels) on the examples both predicted, in a's order."""
    pos = {str(i): k for k, i in enumerate(b["ids"])}
    ia = [k for k, i in enumerate(a["ids"]) if str(i) in pos]
    ib = [pos[str(a["ids"][k])] for k in ia]
    if not np.array_equal(a["labels"][ia], b["labels"][ib]):
        raise ValueError("the two runs disagree on the labels of the same example ids")
    return a["probs"][ia], b["probs"][ib], a["labels"][ia]


def compare(p: np.ndarray, q: np.ndarray, y: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """``p`` minus the reference ``q`` on labels ``y``: ``{metric: (difference, standard error)}`` with acc and
    ECE in points of %."""
    from uqlora.metrics import ece

    idx = np.arange(len(y))
    nll = -np.log(np.clip(p[idx, y], 1e-12, None)) + np.log(np.clip(q[idx, y], 1e-12, None))
    acc = (p.argmax(1) == y).astype(float) - (q.argmax(1) == y).astype(float)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(ece(p[i], y[i]) - ece(q[i], y[i]))
    se = lambda d: float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")  # noqa: E731
    return {"acc": (100 * float(acc.mean()), 100 * se(acc)), "nll": (float(nll.mean()), se(nll)),
            "ece": (100 * (ece(p, y) - ece(q, y)), 100 * float(np.std(boots, ddof=1)))}


def verdict(metric: str, diff: float, se: float) -> str:
    if not np.isfinite(se) or abs(diff) <= 2 * se:
        return "tie"
    return "better" if (diff < 0) == LOWER_IS_BETTER[metric] else "worse"


def paired_rows(runs: list[Run], split: str = "test", reference: str = "map", n_boot: int = 200) -> list[dict]:
    """One row per (model, data, seed, method != reference) whose cell has a reference run with predictions."""
    used, _, _ = split_runs(runs)
    names = method_names(runs)
    order = {m: k for k, m in enumerate(method_order(runs))}
    by_cell: dict[tuple, dict[str, Run]] = {}
    for r in used:
        by_cell.setdefault((r.model, r.data, r.seed), {})[r.method] = r
    rows = []
    for (model, data, seed), cell in sorted(by_cell.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ref = _predictions(cell[reference], split) if reference in cell else None
        if ref is None:
            continue
        for method in sorted(cell, key=lambda m: order.get(m, len(order))):
            p = _predictions(cell[method], split) if method != reference else None
            if p is None:
                continue
            a, b, y = _align(p, ref)
            d = compare(a, b, y, n_boot)
            name = names.get(method, method)
            prec, ref_prec = cell[method].precision, cell[reference].precision
            if prec and ref_prec and prec != ref_prec:  # the difference also holds the precision's effect
                name += f" ({prec}; {names.get(reference, reference)} {ref_prec})"
            rows.append({"model": model, "data": data, "seed": seed, "method": name, "n": len(y),
                         **{m: d[m] for m in METRICS}, **{f"{m}_verdict": verdict(m, *d[m]) for m in METRICS}})
    return rows


def paired_markdown(rows: list[dict], reference: str = "MAP", split: str = "test") -> str:
    lines = [f"## Each method minus {reference}, same {split} examples (difference +- test-set standard error)", "",
             "ACC and ECE in points of %; NLL in nats. better / worse: more than two standard errors from zero "
             "(NLL and ACC: of the per-example differences; ECE: paired bootstrap, 200 resamples).", "",
             "| model | data | seed | method | n | ΔACC | ΔECE | ΔNLL |", "|---|---|---|---|---|---|---|---|"]
    fmt = {"acc": "{:+.1f} ± {:.1f}", "ece": "{:+.1f} ± {:.1f}", "nll": "{:+.3f} ± {:.3f}"}
    for r in rows:
        cells = [f"{fmt[m].format(*r[m])} {r[f'{m}_verdict']}" for m in METRICS]
        lines.append(f"| {r['model']} | {r['data']} | {r['seed']} | {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errdet_compare(u: np.ndarray, ref: np.ndarray, correct: np.ndarray, n_boot: int = 200,
                   seed: int = 0) -> tuple[float, float]:
    """Error-detection ROC-AUC of score ``u`` minus that of ``ref`` (both: higher = more likely wrong) on the same
    predictions, with the standard error of a paired bootstrap (the same resampled examples for both; resamples
    without an error or without a correct prediction are skipped)."""
    from uqlora.metrics.selective import misclassification_auroc as auroc

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(correct), len(correct))
        if correct[i].all() or not correct[i].any():
            continue
        boots.append(auroc(-u[i], correct[i]) - auroc(-ref[i], correct[i]))
    se = float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")
    return float(auroc(-u, correct) - auroc(-ref, correct)), se


def errdet_rows(runs: list[Run], split: str = "test", reference: str = "sr", n_boot: int = 200) -> list[dict]:
    """One row per (run, score != reference) of the runs whose predictions hold ``u_<score>`` arrays: the score's
    error-detection ROC-AUC minus the reference score's, its standard error and verdict (``better`` / ``worse``:
    more than two standard errors from zero)."""
    used, _, _ = split_runs(runs)
    names = method_names(runs)
    rows = []
    for r in sorted(used, key=lambda r: tuple(map(str, (r.model, r.data, r.seed, r.method)))):
        p = _predictions(r, split)
        scores = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in (p or {}).items() if k.startswith("u_")}
        if reference not in scores or len(scores) < 2:
            continue
        correct = np.asarray(p["probs"]).argmax(1) == np.asarray(p["labels"])
        if correct.all() or not correct.any():
            continue
        for score in score_order(sorted(scores)):
            if score == reference:
                continue
            d, se = errdet_compare(scores[score], scores[reference], correct, n_boot)
            rows.append({"model": r.model, "data": r.data, "seed": r.seed, "method": names.get(r.method, r.method),
                         "score": score, "n": len(correct), "errors": int((~correct).sum()), "d_auroc": (d, se),
                         "verdict": verdict("errdet_auroc", d, se)})
    return rows


def errdet_markdown(rows: list[dict], reference: str = "sr", split: str = "test") -> str:
    ref = SCORE_NAMES.get(reference, reference)
    lines = [f"## Error detection: each score minus {ref}, same {split} predictions (difference +- standard error)",
             "", "ROC-AUC of detecting the run's own errors; standard error of a paired bootstrap (200 resamples); "
             "better / worse: more than two standard errors from zero.", "",
             "| model | data | seed | method | n | errors | score | ΔROC-AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, se = r["d_auroc"]
        lines.append(f"| {r['model']} | {r['data']} | {r['seed']} | {r['method']} | {r['n']} | {r['errors']} | "
                     f"{SCORE_NAMES.get(r['score'], r['score'])} | {d:+.3f} ± {se:.3f} {r['verdict']} |")
    return "\n".join(lines) + "\n"
