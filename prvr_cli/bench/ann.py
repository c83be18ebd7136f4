"""`prvr bench search --ann`: approximate candidates with exact scoring against exact search, per library size:
recall@10, latency per query (p50/p99), peak memory and build time.

The prototypes look like real ones. A trained checkpoint encodes every video of a benchmark source (all
splits), and each library video is a mosaic of `SOURCES` real videos: an equal share of each branch's
prototypes from each, jittered by a small random vector and renormalised. So the library is clustered as
the model's outputs are, and no two of its videos are alike. The queries are the source's test queries
through the same model. Each search runs in a fresh process that reads only the cache files (as `prvr
search` does) with the file cache warm, so its peak memory is that of one search.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import load_average, machine

SOURCES = 3          # real videos per library video
JITTER = 0.05        # norm of the random vector added to each prototype before renormalising
WRITE_VIDEOS = 4096  # library videos generated per block


def real_vectors(checkpoint: Path, data, device: str = "cpu") -> dict[str, np.ndarray]:
    """Normalised prototypes of every video of `data` [V, Lp, D] per branch, and its test queries [Q, D]."""
    import torch

    from ..nets.factory import load_checkpoint
    from ..training.evaluate import encode_split

    model, _ = load_checkpoint(checkpoint)
    model = model.to(device).eval()
    unit = lambda t: torch.nn.functional.normalize(t.float(), dim=-1).cpu().numpy()  # noqa: E731
    out = {"clip": [], "frame": []}
    for name, split in data.splits.items():
        videos, queries = encode_split(model, split, device)
        for _, enc in videos:
            out["clip"].append(unit(enc.clip))
            out["frame"].append(unit(enc.frame))
        if name == "test":
            order = np.argsort(np.concatenate([idx.numpy() for idx, _ in queries]))
            out["q_clip"] = np.concatenate([unit(q.clip) for _, q in queries])[order]
            out["q_frame"] = np.concatenate([unit(q.frame) for _, q in queries])[order]
    out["clip"], out["frame"] = np.concatenate(out["clip"]), np.concatenate(out["frame"])
    return out


def write_library(folder: Path, real: dict, n_videos: int, seed: int = 0) -> None:
    """The cache files of a library of `n_videos` mosaic videos (bfloat16 prototype matrices) in `folder`."""
    from ..index.matrices import to_bfloat16

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_real, lp, d = real["clip"].shape
    share = np.arange(lp) * SOURCES // lp                       # which source each prototype slot comes from
    for branch in ("clip", "frame"):
        out = np.lib.format.open_memmap(folder / f"proto_{branch}.npy", mode="w+", dtype=np.uint16,
                                        shape=(n_videos, lp, d))
        for v0 in range(0, n_videos, WRITE_VIDEOS):
            n = min(WRITE_VIDEOS, n_videos - v0)
            sources = np.random.default_rng([seed, v0]).integers(0, n_real, (n, SOURCES))
            slots = rng.integers(0, lp, (n, lp))
            block = real[branch][sources[:, share], slots]                                     # [n, Lp, D]
            noise = rng.standard_normal(block.shape).astype(np.float32)
            block = block + JITTER * noise / np.linalg.norm(noise, axis=-1, keepdims=True)
            out[v0:v0 + n] = to_bfloat16(block / np.linalg.norm(block, axis=-1, keepdims=True))
        out.flush()
        del out
    (folder / "videos.json").write_text(json.dumps({"paths": [f"/library/{v:07d}.mp4" for v in range(n_videos)]}))
    np.save(folder / "copy_of.npy", np.arange(n_videos, dtype=np.int64))


# Each measurement is a fresh interpreter: its peak resident memory (VmHWM, which starts afresh at exec, unlike
# ru_maxrss) is that of the searches alone.
SEARCHES = """
import json, os, sys, time
import numpy as np
from prvr_cli.index.ann import AnnCandidates, AnnSettings
from prvr_cli.index.matrices import PrototypeFile
from prvr_cli.index.search import rank
folder, mode, probe, depth, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cold = sys.argv[6] == "cold"
queries = np.load(folder + "/queries.npz")
clip, frame = PrototypeFile(folder + "/proto_clip.npy"), PrototypeFile(folder + "/proto_frame.npy")
paths = json.load(open(folder + "/videos.json"))["paths"]
ann = AnnCandidates.open(__import__("pathlib").Path(folder)) if mode == "ann" else None
settings = AnnSettings(probe, depth)
times, tops = [], []
for qc, qf in zip(queries["clip"], queries["frame"]):
    if cold:   # a library larger than memory: no prototype page stays cached between queries
        for f in (clip, frame):
            os.posix_fadvise(f.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    hits = rank(paths, clip, frame, qc[None], qf[None], (0.7, 0.3), k, ann=ann, ann_settings=settings)[0]
    times.append(time.perf_counter() - start)
    tops.append([h.video for h in hits])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"times": times, "tops": tops, "peak_rss_mib": hwm / 1024}))
"""


def run_searches(folder: Path, mode: str, probe: int, depth: int, k: int = 10, cold: bool = False) -> dict:
    """One process's searches of every query; `cold`: each query finds no prototype page in the file cache."""
    out = subprocess.run([sys.executable, "-c", SEARCHES, str(folder), mode, str(probe), str(depth), str(k),
                          "cold" if cold else "warm"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return json.loads(out.stdout)


def bench_ann(sizes: list[int], checkpoint: Path, benchmark, folder: Path, n_queries: int = 200,
              probes=(16, 32), depths=(256, 512), seed: int = 0, progress=None, cold: bool = False) -> dict:
    """Recall@10 against exact search, latency, peak memory and build time of the candidates, per size.

    `benchmark()` loads the dataset the checkpoint encodes (only when its encoding is not kept in `folder`).
    With `cold`, the candidates' searches are also timed with the prototype files evicted from the file cache
    before each query: what a library whose search cache is larger than memory sees."""
    from ..index import ann
    from ..index.matrices import PrototypeFile

    say = progress or (lambda message: None)
    folder.mkdir(parents=True, exist_ok=True)
    encoded = folder / f"real-{hashlib.sha1(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]}.npz"
    if encoded.exists():
        real = dict(np.load(encoded))
    else:
        say(f"encoding the benchmark's videos and test queries with {checkpoint}")
        real = real_vectors(checkpoint, benchmark())
        np.savez(encoded, **real)
    pick = np.random.default_rng(seed).choice(len(real["q_clip"]), min(n_queries, len(real["q_clip"])), replace=False)
    cells = []
    for n in sizes:
        lib = folder / f"ann-{n}"
        if not (lib / "videos.json").exists():
            say(f"writing a library of {n} videos in {lib}")
            write_library(lib, real, n, seed)
        np.savez(lib / "queries.npz", clip=real["q_clip"][pick], frame=real["q_frame"][pick])
        if not (lib / ann.MARKER).exists():
            say(f"building the candidates of {n} videos")
        info = json.loads((lib / ann.MARKER).read_text()) if (lib / ann.MARKER).exists() else \
            ann.build(lib, PrototypeFile(lib / "proto_clip.npy"), PrototypeFile(lib / "proto_frame.npy"), seed=seed)
        say(f"{n} videos: exact search")
        exact = run_searches(lib, "exact", 0, 0)
        cell = {"n_videos": n, "build_s": info["seconds"], "centroids": info["centroids"],
                "ann_mib": round(sum(f.stat().st_size for f in lib.glob("ann_*")) / 2 ** 20, 1),
                "cache_mib": round(sum(f.stat().st_size for f in lib.glob("proto_*")) / 2 ** 20, 1),
                "exact": _timing(exact), "ann": [], "load_average": load_average()}
        for probe in probes:
            for depth in depths:
                say(f"{n} videos: candidates, probe {probe}, depth {depth}")
                got = run_searches(lib, "ann", probe, depth)
                recall = np.mean([len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(got["tops"], exact["tops"])])
                cell["ann"].append({"probe": probe, "depth": depth, "recall_at_10": round(float(recall), 4),
                                    **_timing(got)})
        for row in cell["ann"] if cold else []:   # after every warm row: each cold run empties the file cache
            say(f"{n} videos: candidates, probe {row['probe']}, depth {row['depth']}, prototypes not in the file cache")
            row["cold"] = _timing(run_searches(lib, "ann", row["probe"], row["depth"], cold=True))
        cells.append(cell)
    return {"checkpoint": str(checkpoint), "queries": int(len(pick)), "sources_per_video": SOURCES,
            "jitter": JITTER, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": load_average(), "cold": cold, "cells": cells}


def _timing(result: dict) -> dict:
    ms = np.array(result["times"]) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "peak_rss_mib": round(result["peak_rss_mib"], 1)}
