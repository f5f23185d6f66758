"""Predictions of a fitted member on the evaluation splits, and the pooling of members.

Every prediction is a dict of arrays over a split's examples in data order: ``probs [N, C]``, ``labels [N]``,
``ids [N]``, for sampling methods ``samples [S, N, C]``, and any per-example scores a method adds (``u_*``).
"""
from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import torch

from uqlora.errors import UqloraError


def predict(trainer: pl.Trainer, method, dm, split: str) -> dict[str, np.ndarray]:
    """The predictive on every example of ``split``, in data order. With W > 1 processes each predicts a
    contiguous, unpadded shard and the shards are gathered in rank order: every example exactly once, and every
    rank returns the whole split."""
    from uqlora.distributed import all_gather_object, global_rank, shard_loader, world_size

    loader = dm.loader(split)
    world = world_size()  # the process group's: every process runs this same call
    if world > 1:
        loader = shard_loader(loader, world, global_rank())
    outs = trainer.predict(method, dataloaders=loader)
    res = concat_outputs(outs)
    if world > 1:
        res = concat_outputs([p for p in all_gather_object(res) if p])
    res["ids"] = np.array([str(r["id"]) for r in dm.records[split]])
    covered = len(res["labels"] if "labels" in res else res.get("n_tokens", ()))  # n_tokens: generation splits
    if covered != len(res["ids"]):
        raise UqloraError(f"predictions on '{split}' cover {covered} of {len(res['ids'])} examples")
    return res


def concat_outputs(outs: list[dict]) -> dict[str, np.ndarray]:
    """Batch (or per-process) outputs -> one array per key; samples [S, N, C] are joined on the example axis."""
    if not outs:
        return {}
    cat = lambda xs, dim: (torch.cat(xs, dim=dim).cpu().numpy() if torch.is_tensor(xs[0])  # noqa: E731
                           else np.concatenate(xs, axis=dim))
    return {k: cat([o[k] for o in outs], 1 if k == "samples" else 0) for k in outs[0]}


def pool(members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The predictive of M members (ensembles, MultiSWAG, runs pooled by ``eval.py ensemble=[...]``): every
    member contributes its samples (or its probs as one sample); the predictive is the mean probability over all
    M x S draws."""
    if len(members) == 1:
        return members[0]
    if "n_tokens" in members[0]:
        raise UqloraError("pooling members of generation runs is not supported: their predictions keep per-token "
                          "scores, not the vocabulary distributions a pooled predictive averages")
    for m in members[1:]:
        if not np.array_equal(m["labels"], members[0]["labels"]) or not np.array_equal(m["ids"], members[0]["ids"]):
            raise UqloraError("ensemble members were evaluated on different examples; they must share data and seed")
    samples = np.concatenate([m["samples"] if "samples" in m else m["probs"][None] for m in members], axis=0)
    out = {"probs": samples.mean(0), "labels": members[0]["labels"], "ids": members[0]["ids"], "samples": samples}
    if all("gen_scores" in m for m in members):  # free-text rounds: every member's rounds pooled
        out.update({k: members[0][k] for k in ("gen_greedy", "gen_index", "_gen_texts") if k in members[0]})  # greedy: member 0
        out["gen_scores"] = np.concatenate([m["gen_scores"] for m in members], axis=0)
        if "_gen_texts" in out:
            out["_gen_texts"] = {**out["_gen_texts"], "samples": [row for m in members for row in m["_gen_texts"]["samples"]]}
    return out


def pool_splits(member_preds: list[dict[str, dict]]) -> dict[str, dict]:
    """``{split: pooled prediction}`` from each member's ``{split: prediction}``."""
    return {split: pool([mp[split] for mp in member_preds]) for split in member_preds[0]}


def eval_splits(cfg, dm) -> list[str]:
    return [s for s in cfg.eval.splits if dm.has(s)] + (["ood"] if dm.has("ood") else [])


def predict_member(cfg, method, dm, trainer, timings: dict, key: str, member: int = 0,
                   n_members: int = 1) -> dict[str, dict]:
    """One member's predictions on every evaluation split (+ free-text answers when asked for)."""
    preds = {}
    for split in eval_splits(cfg, dm):
        t0 = time.perf_counter()
        preds[split] = predict(trainer, method, dm, split)
        timings[f"predict_{split}{key}"] = round(time.perf_counter() - t0, 3)
        if "n_tokens" in preds[split]:  # generation (token-level SFT): answers, sampled bounds, features
            from uqlora.sft_eval import split_eval

            t0 = time.perf_counter()
            preds[split].update(split_eval(cfg, method, dm, split))
            timings[f"generate_{split}{key}"] = round(time.perf_counter() - t0, 3)
        elif split != "ood" and cfg.eval.get("probabilistic", False) and cfg.eval.get("prob", {}).get("generate", False):
            from uqlora.evaluation import generation_eval

            t0 = time.perf_counter()
            preds[split].update(generation_eval(cfg, method, dm, split, member, n_members))
            timings[f"generate_{split}{key}"] = round(time.perf_counter() - t0, 3)
    return preds
