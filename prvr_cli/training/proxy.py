"""Train a text-proxy re-ranking head on top of a trained checkpoint, and measure re-ranking.

The base model stays frozen: its stored vectors (what an index keeps) and query vectors are computed once
per split, normalised as the index stores them, and the head (`nets.text_proxy`) trains on those. After
training, gamma (the weight of the proxy score) is chosen on the validation split by re-ranking each query's
top K. The result is the base checkpoint with a `proxy` section, usable by `prvr search --rerank K`.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .datasets import PRVRData, Split
from .evaluate import encode_split, gt_ranks, recall_metrics, score_encoded
from .loop import seed_everything
from ..nets.factory import load_checkpoint, save_checkpoint
from ..nets.text_proxy import ProxyConfig, TextProxyHead, weighted_pair_scores

GAMMAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
BRANCHES = ("clip", "frame")


def split_vectors(model, split: Split, device: str = "cpu") -> dict:
    """A split as the index sees it: per branch, stored vectors [V, M, D] with mask and query vectors [Q, D],
    all normalised, plus the first-stage scores [Q, V]."""
    model.eval()
    videos, queries = encode_split(model, split, device)
    first = score_encoded(model, videos, queries, split.n_queries, split.n_videos)
    out = {"first": first}
    for branch in BRANCHES:
        width = max(getattr(enc, branch).shape[1] for _, enc in videos)
        dim = getattr(videos[0][1], branch).shape[2]
        vec = torch.zeros(split.n_videos, width, dim)
        mask = torch.zeros(split.n_videos, width, dtype=torch.bool)
        for idx, enc in videos:
            v, m = getattr(enc, branch), getattr(enc, f"{branch}_mask")
            vec[idx, :v.shape[1]] = F.normalize(v.float(), dim=-1).cpu()
            mask[idx, :v.shape[1]] = m.cpu()
        q = torch.empty(split.n_queries, dim)
        for idx, enc in queries:
            q[idx] = F.normalize(getattr(enc, branch).float(), dim=-1).cpu()
        out[branch] = (vec, mask, q)
    return out


def proxy_pair_scores(head: TextProxyHead, weights, vectors: dict, queries: torch.Tensor, videos: torch.Tensor,
                      chunk: int = 4096) -> torch.Tensor:
    """Branch-weighted proxy score [P] of pairs (query index, video index), in chunks of `chunk` pairs."""
    out = []
    for lo in range(0, len(queries), chunk):
        q, v = queries[lo:lo + chunk], videos[lo:lo + chunk]
        out.append(weighted_pair_scores(head, weights, [(vectors[b][2][q], vectors[b][0][v], vectors[b][1][v])
                                                        for b in BRANCHES]))
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def rerank_proxy_scores(head: TextProxyHead, weights, vectors: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's first-stage top k [Q, k] (video indices, best first) and their proxy scores [Q, k]."""
    head.eval()
    top = vectors["first"].topk(min(k, vectors["first"].shape[1]), dim=1).indices
    q = torch.arange(top.shape[0]).repeat_interleave(top.shape[1])
    return top, proxy_pair_scores(head, weights, vectors, q, top.flatten()).view(top.shape)


def reranked_ranks(first: torch.Tensor, top: torch.Tensor, proxy: torch.Tensor, gamma: float,
                   gt: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's ground truth when its top K is reordered by first + gamma * proxy.

    A ground truth outside the top K keeps its first-stage rank; ties count against the model, as in `evaluate`.
    """
    ranks = gt_ranks(first, gt)
    score = first.gather(1, top) + gamma * proxy                                      # [Q, K]
    inside = top == gt.view(-1, 1)
    hit = inside.any(1)
    gt_score = (score * inside).sum(1, keepdim=True)
    within = (score >= gt_score).sum(1)
    return torch.where(hit, within, ranks)


def choose_gamma(first, top, proxy, gt) -> tuple[float, dict]:
    """The gamma with the best SumR (the smallest on ties), and SumR for each candidate."""
    table = {g: recall_metrics(reranked_ranks(first, top, proxy, g, gt))["SumR"] for g in GAMMAS}
    best = max(GAMMAS, key=lambda g: (round(table[g], 6), -g))
    return best, table


def train_proxy_head(checkpoint: Path, data: PRVRData, out: Path, *, epochs: int = 5, batch_videos: int = 32,
                     lr: float = 1e-4, k: int = 100, device: str = "cpu", seed: int = 0, overrides: dict | None = None,
                     log=print) -> dict:
    """Train a proxy head for `checkpoint` on `data`; keeps the epoch and gamma with the best val SumR re-ranked at
    top `k`; writes out/proxy.pt."""
    seed_everything(seed)
    model, meta = load_checkpoint(checkpoint)
    model = model.to(device)
    if "proxy" in meta:
        log(f"[proxy] {checkpoint} already has a proxy head; training a new one in its place")
    weights = (float(model.cfg.clip_weight), float(model.cfg.frame_weight))
    started = time.time()
    train = split_vectors(model, data.splits["train"], device)
    val = split_vectors(model, data.splits["val"], device)
    n_vectors = train["clip"][0].shape[1] if bool(train["clip"][1].all()) else None
    cfg = ProxyConfig.from_dict(overrides, "proxy")
    head = TextProxyHead(model.output_dim, cfg, n_vectors=n_vectors)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    owner = data.splits["train"].query_video
    log(f"[proxy] base vectors encoded in {time.time() - started:.0f}s; training {epochs} epochs")
    best = None
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(data.splits["train"].n_videos)
        total, steps = 0.0, 0
        for lo in range(0, len(order), batch_videos):
            vids = order[lo:lo + batch_videos].sort().values
            q = torch.nonzero(torch.isin(owner, vids)).flatten()
            local = torch.searchsorted(vids, owner[q])                 # each query's video within the batch
            loss = 0.0
            for w, branch in zip(weights, BRANCHES):
                vec, mask, qv = train[branch]
                terms = head.loss(qv[q], vec[vids], mask[vids], local)
                loss = loss + w * sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        top, proxy = rerank_proxy_scores(head, weights, val, k)
        gamma, table = choose_gamma(val["first"], top, proxy, data.splits["val"].query_video)
        log(f"[proxy] epoch {epoch + 1}: loss {total / max(steps, 1):.4f}; val SumR first stage {table[0.0]:.2f}, "
            f"re-ranked top {k} {table[gamma]:.2f} at gamma {gamma}")
        if best is None or table[gamma] > best["val_sumr"][best["gamma"]]:
            best = {"epoch": epoch + 1, "gamma": gamma, "val_sumr": table,
                    "state_dict": {name: t.detach().clone() for name, t in head.state_dict().items()}}
    log(f"[proxy] keeping epoch {best['epoch']}, the best re-ranked val SumR")
    gamma, table = best["gamma"], best["val_sumr"]
    if gamma == 0.0:
        warnings.warn(f"the head's score weight chosen on val is 0 (val SumR {table[0.0]:.2f} is not improved by "
                      f"re-ranking), so `prvr search --rerank K` with {out / 'proxy.pt'} keeps the first stage's order")
    extra = {key: value for key, value in meta.items()
             if key not in ("format", "method", "config", "dims", "feature_source", "metrics", "proxy")}
    extra["proxy"] = {"config": cfg.as_dict(), "state_dict": best["state_dict"], "gamma": gamma,
                      "n_vectors": n_vectors, "k": k, "val_sumr": table, "epoch": best["epoch"],
                      "base": str(Path(checkpoint).resolve())}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "proxy.pt"
    save_checkpoint(path, model, feature_source=meta.get("feature_source", {}), metrics=meta.get("metrics"),
                    extra=extra)
    return {"checkpoint": str(path), "gamma": gamma, "val_sumr": table, "epoch": best["epoch"],
            "train_videos": data.splits["train"].n_videos,
            "seconds": round(time.time() - started, 1)}
