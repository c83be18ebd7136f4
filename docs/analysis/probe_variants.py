"""Linear-probe variants for the semi-synthetic benchmark (analysis, not part of prvr; docs/benchmarks.md, section 8).

The linear InfoNCE probe of ../shared/bench/baseline.py (its `fit_infonce` recipe: a linear map of the mean query
token, Adam at 1e-3, 256 queries a step, text-to-video InfoNCE on the max cosine / 0.05) with a choice of what a
video offers the query to match:

    lin        every frame (the probe itself)
    ctx        every frame minus a learned share of the video's mean frame
    spanW      every window of 1 to W consecutive frames, averaged
    ctx_spanW  both

    python docs/analysis/probe_variants.py --data /work/cgb --collection charades --epochs 12 --seed 0 --variant span4

Prints one JSON line: the variant, the learned share, val and test R@1/5/10/100 and SumR, seconds.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", required=True)
parser.add_argument("--collection", required=True)
parser.add_argument("--epochs", type=int, default=12)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--variant", default="lin")
parser.add_argument("--bench", default="../shared/bench", help="folder holding baseline.py")
args = parser.parse_args()
sys.path.insert(0, args.bench)
from baseline import load_split, recall  # noqa: E402  (the benchmark's own loader and metric)

variant = args.variant
if variant not in ("lin", "ctx") and not variant.removeprefix("ctx_").removeprefix("span").isdigit():
    sys.exit(f"error: --variant {variant!r} is not one of lin, ctx, spanW, ctx_spanW (W a number of frames)")
width = int(variant.split("span")[1]) if "span" in variant else 1
use_share = variant.startswith("ctx")
share = torch.zeros((), requires_grad=True)


def padded(videos):
    """Unit frames [V, T, D] and their mask [V, T]."""
    length = max(len(v) for v in videos)
    frames = torch.zeros(len(videos), length, videos[0].shape[1])
    mask = torch.zeros(len(videos), length, dtype=torch.bool)
    for i, v in enumerate(videos):
        frames[i, :len(v)], mask[i, :len(v)] = F.normalize(torch.from_numpy(v), dim=-1), True
    return frames, mask


def candidates(frames, mask):
    """What each video offers [V, N, D] and its mask [V, N]: window means of 1..width frames, less share * mean."""
    m = mask[..., None].float()
    if use_share:
        frames = frames - share * (frames * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    frames = frames * m
    sums = torch.cat([torch.zeros_like(frames[:, :1]), frames.cumsum(1)], 1)
    counts = torch.cat([torch.zeros_like(m[:, :1]), m.cumsum(1)], 1)
    out, valid = [], []
    for w in range(1, min(width, frames.shape[1]) + 1):
        out.append((sums[:, w:] - sums[:, :-w]) / w)
        valid.append((counts[:, w:] - counts[:, :-w])[..., 0] == w)
    return torch.cat(out, 1), torch.cat(valid, 1)


def max_cosine(queries, frames, mask):
    """[Q, V] max over each video's candidates of the cosine with the mapped queries."""
    offered, valid = candidates(frames, mask)
    cos = torch.einsum("qd,vnd->qvn", F.normalize(queries, dim=-1), F.normalize(offered, dim=-1))
    return cos.masked_fill(~valid[None], -2).max(-1).values


torch.manual_seed(args.seed)
start = time.time()
(train_q, train_v, train_gt), *evaluated = [load_split(args.data, args.collection, "cg", s)
                                            for s in ("train", "val", "test")]
frames, mask = padded(train_v)
linear = torch.nn.Linear(train_q.shape[1], frames.shape[-1])
optimizer = torch.optim.Adam(list(linear.parameters()) + ([share] if use_share else []), 1e-3)
queries, owners = torch.from_numpy(train_q), torch.from_numpy(train_gt)
for _ in range(args.epochs):
    order = torch.randperm(len(queries))
    for i in range(0, len(queries), 256):
        rows = order[i:i + 256]
        videos, target = torch.unique(owners[rows], return_inverse=True)   # the batch's own videos
        logits = max_cosine(linear(queries[rows]), frames[videos], mask[videos]) / 0.05
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
result = {"variant": variant, "epochs": args.epochs, "seed": args.seed, "share": round(float(share), 4)}
with torch.no_grad():
    for split, (q, videos, gt) in zip(("val", "test"), evaluated):
        f, m = padded(videos)
        mapped = linear(torch.from_numpy(q))
        scores = torch.cat([max_cosine(mapped, f[i:i + 64], m[i:i + 64]) for i in range(0, len(f), 64)], 1)
        result[split] = recall(scores.numpy(), gt)
result["seconds"] = round(time.time() - start, 1)
print(json.dumps(result))
