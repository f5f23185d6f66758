"""Kronecker-factored curvature (KFAC) of the LoRA layers, as Laplace-LoRA (Yang et al. 2024) uses it.

For a linear layer ``y = W a`` (W: [out, in]; a bias is an extra input column of ones) the GGN / Fisher
block of the summed negative log-likelihood is approximated as

    H  ~=  (1/N) * G (x) A,      A = sum_n a_n a_n^T  [in, in],      G = sum_n E_y[g_n g_n^T]  [out, out]

with ``vec`` the row-major flattening of W (``vec(g a^T) = g (x) a``) and ``g_n`` the gradient of
``-log p(y | x_n)`` w.r.t. the layer's output. LoRA A ([r, d_in]) and LoRA B ([d_out, r]) are separate
layers, and the classifier head (or the answer rows of a causal LM's head) is one more layer.

Sequences (weight sharing over the T_n positions of example n, one loss per example; Eschenhagen et al.
2023). ``g_{n,t}`` = the output gradient at position t, ``a_{n,t}`` = the input there; three definitions
(``approx``), which differ in the scale of the LoRA layers' factors (the head sees one vector per example,
T = 1, and gets the same factors under all three):

* ``reduce`` (KFAC-reduce): ``A = sum_n abar_n abar_n^T`` with ``abar_n`` the mean input over the example's
  non-pad positions, ``G = sum_n E[(sum_t g_{n,t})(sum_t g_{n,t})^T]``.
* ``expand`` (KFAC-expand with curvlinops' scale; the default): ``A = sum_n (1/T_n) sum_t a_{n,t} a_{n,t}^T``
  over the example's non-pad positions (its own length, where curvlinops divides by the padded length, pads
  included), ``G = sum_n sum_t E[g_{n,t} g_{n,t}^T]``.
* ``expand_sum`` (KFAC-expand as the Laplace-LoRA code computes it: ASDL's ``kfac-expand`` called with
  ``data_size=1``, inputs flattened over batch x positions, then divided by N by laplace-torch):
  ``A = sum_n sum_t a_{n,t} a_{n,t}^T`` over *every* position of the padded batch, pads included, no 1/T;
  ``G`` as ``expand``. So A is ~T times ``expand``'s, and it depends on how examples are batched and
  padded (a short sentence in a long batch adds its pad activations), as in the paper's code.

Under ``reduce`` and ``expand`` pad positions are masked out (they have zero output gradient), so those
factors do not depend on the batching. A layer's input per example is ``[T, d]`` over the positions the
``attention_mask`` marks as real: for the cloze head in its packed layout (``model.cloze_impl=packed``) one
sequence, the context once and then the C continuations; in the separate layout its C sequences together
(``[C*L, d]``, the context C times). The Jacobians (GLM predictive) of the two layouts are equal; the KFAC
factors depend on the computation graph (how often the context's positions enter), so the two layouts give
different factors, each equal to its own definition. None of the three equals the exact GGN for one loss per sequence (``reduce`` does for a layer
followed linearly by mean pooling; tests/test_laplace.py reports all three's trace ratios to the GGN).

Fisher (``fisher``): ``exact`` -- E over y ~ p(y|x) computed in closed form from the C vectors
``sqrt(p_c) (e_c - p)`` (whose outer products sum to diag(p) - p p^T); ``mc`` -- ``n`` labels sampled
from the model's predictive; ``empirical`` -- the true label. All C (or n) backward passes of a batch
are one vmapped vector-Jacobian product (``autograd.grad(..., is_grads_batched=True)``), after one
forward pass. The model must be in eval mode (no dropout) while fitting; :func:`fit_kfac` checks it.

Factors wider than ``lowrank_threshold`` are kept as a rank-``n_kfac`` square root ``B`` (``B B^T ~= A``)
updated by incremental SVD of ``[B, new rows]`` -- the paper's treatment of the wide factor of LoRA A
(its input) and LoRA B (its output). Everything is a sum, so factors from several processes combine by
summing (dense) or by re-truncating the stacked square roots (:meth:`Factor.merge`): under DDP each process
fits its shard of the data and :func:`reduce_kfac` sums the shards (:meth:`Factor.all_reduce`).
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from uqlora.core.kron_factor import Factor, stable_eigh, stable_svd  # noqa: F401  (re-exported)
from uqlora.errors import UqloraError

log = logging.getLogger(__name__)
FISHERS = ("exact", "mc", "empirical")
SUBSETS = ("all", "last_layer")
KFAC_APPROX = ("reduce", "expand", "expand_sum")


@dataclass
class KFACLayer:
    """One linear map covered by the posterior: ``out = weight @ in (+ bias)``."""

    name: str
    weight: nn.Parameter                       # [out, in]
    bias: nn.Parameter | None
    module: nn.Module                          # whose input (Linear) / output (head_input) is the layer input
    kind: str                                  # lora | head
    prior_mean: torch.Tensor | None = None     # [out, in (+1)] mean of the Gaussian prior; None: zero
    A: Factor | None = None
    G: Factor | None = None
    _in: list = field(default_factory=list, repr=False)
    _out: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1]) + (self.bias is not None)

    def matrix(self) -> torch.Tensor:
        """The layer's parameters as one [out, in (+1)] matrix (bias as the last column)."""
        w = self.weight.detach()
        return w if self.bias is None else torch.cat([w, self.bias.detach().unsqueeze(1)], dim=1)

    def assign(self, mat: torch.Tensor) -> None:
        with torch.no_grad():
            if self.bias is None:
                self.weight.copy_(mat.to(self.weight))
            else:
                self.weight.copy_(mat[:, :-1].to(self.weight))
                self.bias.copy_(mat[:, -1].to(self.bias))


def select_layers(backbone: nn.Module, subset: str = "all") -> list[KFACLayer]:
    """The layers of the posterior: every trainable LoRA A/B linear + the trained head (``all``), or the
    head alone (``last_layer``, the LLLA baseline; without a trained head: the LoRA layers of the last
    transformer block)."""
    if subset not in SUBSETS:
        raise UqloraError(f"unknown method.subset '{subset}'; valid choices: {', '.join(SUBSETS)}")
    lora = [KFACLayer(n, m.weight, m.bias if (m.bias is not None and m.bias.requires_grad) else None, m, "lora")
            for n, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and re.search(r"lora_[AB]", n) and m.weight.requires_grad]
    head = None
    hp = backbone.head_parameters() if hasattr(backbone, "head_parameters") else None
    if hp is not None:
        w, b = hp
        head = KFACLayer("head", w, b if (b is not None and b.requires_grad) else None, backbone.head_input, "head")
        head.prior_mean = head_prior_mean(backbone, head.bias is not None)
    if subset == "all":
        layers = lora + ([head] if head else [])
    elif head is not None:
        layers = [head]
    else:
        idx = [int(m.group(1)) for lay in lora if (m := re.search(r"\.(\d+)\.", lay.name))]
        if not idx:
            raise UqloraError("method.subset=last_layer: the model has no trained head and no numbered blocks")
        layers = [lay for lay in lora if re.search(rf"\.{max(idx)}\.", lay.name)]
    if not layers:
        raise UqloraError("the model has no trainable LoRA/head parameters for the Laplace posterior")
    return layers


def head_prior_mean(backbone: nn.Module, with_bias: bool) -> torch.Tensor | None:
    """The prior mean of the head layer as one ``[C, d (+1)]`` matrix: for an ``lm_choices`` head, whose
    trained answer rows start from the pretrained LM-head rows of the answer tokens, those pretrained rows
    (the prior is on the change, as the paper's LoRA on the LM head puts it on a zero-initialised delta);
    None (a zero mean) for a freshly initialised classifier head."""
    if getattr(backbone, "head_kind", "") != "lm_choices":
        return None
    lm_head, ids = getattr(backbone, "generation_lm_head", None), getattr(backbone, "answer_token_ids", None)
    if lm_head is None or ids is None:
        log.warning("lm_choices head without its pretrained LM head: the Laplace prior is centred at zero")
        return None
    w = lm_head.weight.detach()[ids.to(lm_head.weight.device)].to(torch.float64)
    if with_bias:
        b = getattr(lm_head, "bias", None)
        b = torch.zeros(len(ids), dtype=torch.float64, device=w.device) if b is None else b.detach()[ids].double()
        w = torch.cat([w, b.unsqueeze(1)], dim=1)
    return w.cpu()


@contextlib.contextmanager
def capture(layers: list[KFACLayer]):
    """Record each layer's input (and, for LoRA linears, its output tensor for the backward pass)."""
    handles = []
    for lay in layers:
        lay._in.clear(), lay._out.clear()
        if lay.kind == "head":
            handles.append(lay.module.register_forward_hook(lambda m, i, o, lay=lay: lay._in.append(o.detach())))
        else:
            def hook(m, i, o, lay=lay):
                lay._in.append(i[0].detach())
                lay._out.append(o)
            handles.append(lay.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fisher_vectors(probs: torch.Tensor, labels: torch.Tensor, fisher: str, n_samples: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Vectors ``v [S, B, C]`` (gradients of the NLL w.r.t. the logits, up to sign) whose outer products,
    summed over S, give the Fisher's output-space matrix per example."""
    p = probs.double()
    B, C = p.shape
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    if fisher == "exact":
        return (p.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0)))  # [C, B, C]
    if fisher == "mc":
        if n_samples < 1:
            raise UqloraError(f"method.fisher_samples must be >= 1, got {n_samples}")
        y = torch.multinomial(p.cpu(), n_samples, replacement=True, generator=generator).to(p.device).T  # [S, B]
        return (p.unsqueeze(0) - eye[y]) / n_samples ** 0.5
    if fisher == "empirical":
        return (p - eye[labels]).unsqueeze(0)
    raise UqloraError(f"unknown method.fisher '{fisher}'; valid choices: {', '.join(FISHERS)}")


def output_grads(logits: torch.Tensor, layers: list[KFACLayer], V: torch.Tensor) -> list[torch.Tensor]:
    """For each layer, the vector-Jacobian products ``V[s]^T d logits / d output`` as ``[S, *output]``:
    one vmapped backward pass for LoRA linears; the head's output *is* the logits, so its are ``V``."""
    lora = [lay for lay in layers if lay.kind == "lora"]
    outs = [lay._out[-1] for lay in lora]
    V = V.to(logits.dtype)
    grads: list[torch.Tensor] = []
    if outs:
        try:
            grads = list(torch.autograd.grad(logits, outs, grad_outputs=V, is_grads_batched=True, retain_graph=False))
        except RuntimeError as e:  # an op without a vmap rule: fall back to one backward pass per vector
            log.debug("batched VJP failed (%s); looping over %d vectors", e, V.shape[0])
            per = [torch.autograd.grad(logits, outs, grad_outputs=v, retain_graph=i < V.shape[0] - 1)
                   for i, v in enumerate(V)]
            grads = [torch.stack([g[j] for g in per]) for j in range(len(outs))]
    it = iter(grads)
    return [V if lay.kind == "head" else next(it) for lay in layers]


def _rows(x: torch.Tensor, n_examples: int) -> torch.Tensor:
    """[rows, (L,) d] -> [B, R*L, d]: the positions of each example together (R rows per example: 1, or C for
    the separate cloze layout and ``mc_classifier``)."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    return x.reshape(n_examples, -1, x.shape[-1])


def layer_inputs(lay: KFACLayer, n_examples: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs per example ``[B, T, in(+1)]`` and their position mask ``[B, T]`` (the head, and
    any layer fed one vector per example, has T = 1 and no padding)."""
    a = lay._in[-1]
    per_position = a.dim() > 2 and mask is not None
    a = _rows(a, n_examples)
    m = mask.reshape(n_examples, -1).bool() if per_position else torch.ones(a.shape[:2], dtype=torch.bool,
                                                                              device=a.device)
    if lay.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, m


@dataclass
class KFACResult:
    layers: list[KFACLayer]
    n_data: int
    log_lik: float  # sum over the fit data of log p(y_n | x_n, theta_MAP)


def init_factors(layers: list[KFACLayer], lowrank_threshold: int, n_kfac: int, device) -> None:
    for lay in layers:
        out_dim, in_dim = lay.shape
        lay.A = Factor(in_dim, n_kfac if in_dim > lowrank_threshold else None, device=device)
        lay.G = Factor(out_dim, n_kfac if out_dim > lowrank_threshold else None, device=device)


def accumulate(layers: list[KFACLayer], logits: torch.Tensor, batch: dict, fisher: str, n_samples: int = 1,
               generator: torch.Generator | None = None, approx: str = "expand") -> float:
    """Add one batch (captured by :func:`capture`) to the factors; returns the batch's summed log-likelihood.

    ``approx="reduce"``: one row per example (mean input, summed output gradient). ``approx="expand"``:
    one row per non-pad position, inputs scaled by ``1/sqrt(T_n)`` so A sums each example's *mean* of
    ``a_t a_t^T`` over its T_n positions, and G sums ``g_t g_t^T`` over every position.
    ``approx="expand_sum"``: one row per position of the padded batch, pads included, unscaled."""
    labels = batch["labels"]
    logp = torch.log_softmax(logits.detach().double(), -1)
    ll = float(logp.gather(1, labels.unsqueeze(1)).sum())
    V = fisher_vectors(logp.exp(), labels, fisher, n_samples, generator)
    add_to_factors(layers, output_grads(logits, layers, V), batch, approx)
    for lay in layers:
        lay._in.clear(), lay._out.clear()
    return ll


def add_to_factors(layers: list[KFACLayer], grads: list[torch.Tensor], batch: dict, approx: str = "expand") -> None:
    """Add each layer's captured inputs and its output gradients ``grads`` (:func:`output_grads`) to its
    factors under the KFAC definition ``approx`` (see :func:`accumulate`)."""
    B = batch["labels"].shape[0]
    mask = batch.get("attention_mask")
    for lay, g in zip(layers, grads):
        a, m = layer_inputs(lay, B, mask)
        mf = m.unsqueeze(-1).to(torch.float64)
        S, d_out = g.shape[0], g.shape[-1]
        g = g.reshape(S, B, -1, d_out).double()
        if approx == "expand":
            a_rows = (a.double() * (mf / mf.sum(1, keepdim=True).clamp(min=1.0)).sqrt())[m]   # [sum T_n, in]
            lay.A.update(a_rows)
            lay.G.update(g[:, m].reshape(-1, d_out))                            # pads: zero gradient anyway
        elif approx == "expand_sum":
            lay.A.update(a.double().reshape(-1, a.shape[-1]))                   # [B * T, in]: pads included
            lay.G.update(g.reshape(-1, d_out))
        else:
            lay.A.update((a.double() * mf).sum(1) / mf.sum(1).clamp(min=1.0))  # [B, in]: mean over positions
            lay.G.update(g.sum(2).reshape(S * B, d_out))                        # sum over positions


def check_eval_mode(module: nn.Module) -> None:
    active = [n for n, m in module.named_modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    if active:
        raise UqloraError(f"KFAC must be fitted without dropout, but {len(active)} dropout modules are in "
                          f"training mode (e.g. '{active[0]}'); call .eval() first")


def reduce_kfac(result: KFACResult, group=None) -> KFACResult:
    """Sum the factors, the example count and the log-likelihood of per-process fits (each process fitted
    :func:`fit_kfac` on its own shard of the data) over the processes of ``group``; every process gets the
    sums. The identity without an initialised process group (or with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return result
    for lay in result.layers:
        lay.A.all_reduce(group)
        lay.G.all_reduce(group)
    ref = result.layers[0].A
    dev = ref.mat.device if not ref.lowrank else ref.root.device
    tot = torch.tensor([float(result.n_data), result.log_lik], dtype=torch.float64, device=dev)
    dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
    n = int(round(tot[0].item()))
    if n == 0:
        raise UqloraError("the Laplace fit split is empty")
    return KFACResult(result.layers, n, float(tot[1].item()))


def fit_kfac(backbone: nn.Module, loader, layers: list[KFACLayer], fisher: str = "exact", n_samples: int = 1,
             lowrank_threshold: int = 100, n_kfac: int = 10, device=None, autocast=None, seed: int = 0,
             progress: bool | str = True, approx: str = "expand", allow_empty: bool = False) -> KFACResult:
    """One forward and one (vmapped) backward pass per batch over ``loader``; the model is put in eval mode.
    ``allow_empty``: an empty loader gives zero factors (a process's empty shard, summed by :func:`reduce_kfac`)."""
    if approx not in KFAC_APPROX:
        raise UqloraError(f"unknown method.kfac_approx '{approx}'; valid choices: {', '.join(KFAC_APPROX)}")
    if fisher not in FISHERS:
        raise UqloraError(f"unknown method.fisher '{fisher}'; valid choices: {', '.join(FISHERS)}")
    if n_kfac < 1:
        raise UqloraError(f"method.n_kfac must be >= 1, got {n_kfac}")
    backbone.eval()
    check_eval_mode(backbone)
    device = device or next(backbone.parameters()).device
    init_factors(layers, lowrank_threshold, n_kfac, device)
    gen = torch.Generator().manual_seed(int(seed))
    autocast = autocast or contextlib.nullcontext()
    n, ll = 0, 0.0
    from uqlora.progress import track

    for batch in track(loader, "Laplace: KFAC factors", progress):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.enable_grad():
            with capture(layers), autocast:
                logits = backbone.logits(batch)
            if not torch.isfinite(logits).all():
                raise UqloraError("non-finite logits while fitting the KFAC factors (a diverged MAP model?)")
            ll += accumulate(layers, logits, batch, fisher, n_samples, gen, approx)
        n += int(batch["labels"].shape[0])
    if n == 0 and not allow_empty:
        raise UqloraError("the Laplace fit split is empty")
    return KFACResult(layers, n, ll)


def per_example_jacobians(layers: list[KFACLayer], logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Exact Jacobians of the C logits w.r.t. each layer's weight matrix, per example: ``[B, C, out, in]``.
    One vmapped backward pass of the C unit vectors after the forward pass captured by :func:`capture`;
    ``J = sum_t g_t a_t^T`` over the example's positions (pad positions have zero gradient)."""
    B, C = logits.shape
    V = torch.eye(C, dtype=logits.dtype, device=logits.device).unsqueeze(1).expand(C, B, C)
    grads = output_grads(logits, layers, V)
    mask = batch.get("attention_mask")
    jacs = []
    for lay, g in zip(layers, grads):
        a, _ = layer_inputs(lay, B, mask)
        dt = torch.promote_types(a.dtype, torch.float32) if a.dtype != torch.float64 else torch.float64
        g = g.reshape(C, B, -1, g.shape[-1]).to(dt)
        jacs.append(torch.einsum("cbto,bti->bcoi", g, a.to(dt)))
    for lay in layers:
        lay._in.clear(), lay._out.clear()
    return jacs
