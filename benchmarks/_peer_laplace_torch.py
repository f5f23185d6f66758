"""Peer baseline: the laplace-torch library (``pip install laplace-torch==0.3.*``) on a uqlora backbone.

Used by benchmarks to put the library's KFAC Laplace next to our own Laplace-LoRA. laplace-torch is NOT a
dependency of uqlora: it is imported inside the functions, so importing this file without it works and
calling a function raises ImportError with an install hint. Tested with laplace-torch 0.3,
curvlinops-for-pytorch 3.0.1, asdl 0.1a4 (``asdfghjkl``), backpack-for-pytorch 1.7.1, torch 2.13 (CPU),
transformers 5.23 and peft 0.21, in a separate venv (torchvision, which laplace-torch pulls in, must be
uninstalled there: a torchvision built for another torch breaks ``import torchmetrics``).

What is fitted: ``KronLaplace`` (``subset_of_weights="all"``, ``hessian_structure="kron"``,
``likelihood="classification"``). laplace-torch puts the Laplace on every parameter with
``requires_grad``, so on a uqlora backbone that is exactly the LoRA A/B matrices plus the classifier head.
Batches are uqlora's dicts: laplace-torch 0.3 passes a ``MutableMapping`` batch whole to
``model(batch)`` (``Backbone.forward(batch) == logits(batch)``), takes ``y = batch[dict_key_y]``
("labels") and uses ``batch[dict_key_x]`` ("input_ids") only to count the batch size. No wrapper is needed.

Backends (``backend=``): ``curvlinops`` (CurvlinopsGGN, the library default; works), ``asdl`` (AsdlGGN;
also works, but warns on every prediction and falls back to torch.func Jacobians; its LoRA Kronecker
factors are ~T (padded sequence length) times curvlinops' -- it sums the input covariance over token
positions where curvlinops' KFAC-expand averages it -- so the log marginal likelihood and a marglik-tuned
prior differ between the two, while probit predictions agreed to ~4e-4 on MiniLM/SST-2),
``backpack`` (BackPackGGN; rejected by laplace-torch itself: "If some grad are switched off, the BackPACK
and Asdfghjkl backends are not supported." -- the frozen base weights -- and it would also refuse dict
batches in ``fit``).

Cost notes: the GLM predictive computes Jacobians with ``torch.func.jacrev`` on the whole batch output
[B, C], i.e. B*C vector-Jacobian products over the whole batch, so its time grows as B**2 per batch.
``peer_predict(chunk_size=...)`` splits each loader batch into chunks to avoid that (chunk_size=1 was
~15x faster than B=32 for MiniLM on CPU); the default ``None`` calls the library on the loader's
batches as they come, which is how the library is used out of the box.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

_INSTALL_HINT = ("laplace-torch is not installed; install it in a separate environment, e.g. "
                 "`pip install 'laplace-torch==0.3.*' -c constraints.txt` (constraints.txt pinning your torch "
                 "version), then `pip uninstall -y torchvision` if `import torchmetrics` fails")
BACKENDS = ("curvlinops", "asdl", "backpack")
LINKS = ("probit", "bridge", "bridge_norm", "mc")


def _laplace():
    try:
        import laplace
        from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return laplace, {"curvlinops": CurvlinopsGGN, "asdl": AsdlGGN, "backpack": BackPackGGN}


def _check_kron_layout(la) -> None:
    """The Kronecker blocks must line up with ``la.params`` (weight [out, in] -> [B out x out, A in x in],
    bias -> [B]); laplace-torch builds them in module order and the parameters in registration order, so a
    model whose order differs would get a silently wrong posterior."""
    facs = la.H_facs.kfacs
    if len(facs) != len(la.params):
        raise RuntimeError(f"laplace-torch built {len(facs)} Kronecker blocks for {len(la.params)} parameters")
    for F, p in zip(facs, la.params):
        n = int(np.prod([f.shape[0] for f in F]))
        if n != p.numel():
            raise RuntimeError(f"Kronecker block {[tuple(f.shape) for f in F]} does not match a parameter of "
                               f"shape {tuple(p.shape)}")


def fit_peer(backbone, train_loader, prior: str = "fixed", prior_precision: float = 1.0, *,
             backend: str = "curvlinops", marglik_steps: int = 100,
             kfac_approx: str | None = None) -> tuple[Any, float]:
    """Fit laplace-torch's KronLaplace on ``backbone`` (LoRA + head parameters) over ``train_loader``.

    ``prior="fixed"`` keeps the scalar ``prior_precision``; ``prior="marglik"`` then calls
    ``la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=marglik_steps,
    init_prior_prec=prior_precision)`` (scalar prior, Adam on log-precision, lr 0.1 -- the library's defaults).

    Returns ``(la, seconds)`` where seconds = curvature fit + marglik (if any); the split is in
    ``la.peer_timings = {"fit_s": ..., "marglik_s": ...}``. N is ``len(train_loader.dataset)``.

    ``kfac_approx`` (curvlinops only): None = the library default, KFAC-*expand* (every token position is
    an extra "example": A = mean over N*T positions of x x^T, B = sum over N*T positions of g g^T);
    "reduce" = KFAC-reduce (A from the per-sequence mean input, B from the per-sequence summed output
    gradient), which is the convention for one loss per sequence and what uqlora's own KFAC uses -- but
    curvlinops averages over all T padded positions (pads included), uqlora masks pads out. laplace-torch
    forwards it to curvlinops through its ``asdl_fisher_kwargs`` argument.
    """
    if prior not in ("fixed", "marglik"):
        raise ValueError(f"prior must be 'fixed' or 'marglik', got {prior!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kfac_approx not in (None, "expand", "reduce"):
        raise ValueError(f"kfac_approx must be None, 'expand' or 'reduce', got {kfac_approx!r}")
    if kfac_approx is not None and backend != "curvlinops":
        raise ValueError("kfac_approx is only forwarded to the curvlinops backend")
    laplace, backends = _laplace()
    backbone.eval()  # laplace-torch also calls model.eval() in fit; dropout must be off for the curvature
    t0 = time.perf_counter()
    la = laplace.Laplace(backbone, "classification", subset_of_weights="all", hessian_structure="kron",
                         prior_precision=float(prior_precision), backend=backends[backend],
                         dict_key_x="input_ids", dict_key_y="labels",
                         asdl_fisher_kwargs=None if kfac_approx is None else {"kfac_approx": kfac_approx})
    la.fit(train_loader)
    fit_s = time.perf_counter() - t0
    _check_kron_layout(la)
    marglik_s = 0.0
    if prior == "marglik":
        t0 = time.perf_counter()
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=int(marglik_steps),
                                    init_prior_prec=float(prior_precision), prior_structure="scalar")
        marglik_s = time.perf_counter() - t0
    la.peer_timings = {"fit_s": fit_s, "marglik_s": marglik_s}
    la.peer_config = {"backend": backend,
                      "kfac_approx": (kfac_approx or "expand") if backend == "curvlinops" else None,
                      "prior": prior, "prior_precision_init": float(prior_precision)}
    return la, fit_s + marglik_s


def batch_chunks(batch: dict, step: int) -> list[dict]:
    """``batch`` split into consecutive batches of at most ``step`` rows (per-row tensors sliced, the rest kept)."""
    import torch

    n = int(batch["labels"].shape[0])
    return [{k: (v[i:i + step] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v)
             for k, v in batch.items()} for i in range(0, n, step)]


def peer_predict(la, loader, link: str = "probit", *, n_samples: int = 100,
                 chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """GLM predictive ``la(batch, pred_type="glm", link_approx=link)`` over ``loader``.

    Returns ``(probs [N, C], labels [N], seconds)``. ``link``: probit | bridge | bridge_norm | mc
    (``n_samples`` draws of the linearised logits). ``chunk_size`` splits each batch (see the module doc).
    """
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    _laplace()
    import torch

    la.model.eval()
    probs, labels = [], []
    t0 = time.perf_counter()
    for batch in loader:
        n = int(batch["labels"].shape[0])
        for x in batch_chunks(batch, n if not chunk_size else int(chunk_size)):
            p = la(x, pred_type="glm", link_approx=link, n_samples=n_samples)
            probs.append(p.detach().cpu().double())
            labels.append(x["labels"].cpu())
    seconds = time.perf_counter() - t0
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), seconds


def peer_memory_floats(la, decomposed: bool = False) -> int:
    """Floats in the fitted posterior's Kronecker factors (``la.H_facs``: per weight a gradient factor
    out x out and an input factor in x in, per bias one out x out factor). The MAP mean (P floats) is not
    counted. ``decomposed=True`` adds the eigendecomposition ``la.H`` that laplace-torch keeps alongside
    (eigenvectors + eigenvalues), i.e. what it actually holds in memory after ``fit``."""
    total = sum(int(f.numel()) for F in la.H_facs.kfacs for f in F)
    if decomposed:
        H = la.H
        total += sum(int(q.numel()) for Qs in H.eigenvectors for q in Qs)
        total += sum(int(e.numel()) for ls in H.eigenvalues for e in ls)
    return total
