"""`prvr bench search --end-to-end`: the wall time and peak memory of whole `prvr search` commands.

Each corpus size gets a synthetic index: a real CLIP encoder's identity and exported text side
(random weights run at the same speed as trained ones), zero-shot prototypes as random unit vectors
of the encoder's dimension, and per-prototype attention over 60 frames. Nothing about accuracy
is measured. Each search is a fresh process (`python -m prvr_cli search ...`), so the figures
include starting Python, importing, loading the query side and reading the search cache, with the
file cache warm (the second of two runs onward).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .common import load_average, machine

FRAMES = 60          # frames per synthetic video (20 s at prvr's default 3 fps)
CHUNK = 2000         # videos per table write
QUERIES = ["a man grabs his coffee", "two dogs run on a beach", "someone opens the fridge and takes out milk",
           "a child rides a red bicycle down the street", "the crowd cheers as the ball goes in"]


def synthetic_index(root: Path, n_videos: int, encoder, seed: int = 0, progress=None) -> Path:
    """An index at `root` holding `n_videos` synthetic zero-shot videos of `encoder`'s dimension (made once)."""
    from ..index.rows import schemas, to_table
    from ..index.store import Index
    from ..pipeline.export import export_text_tower
    from ..pipeline.prototypes import ZeroShotPrototypes

    idx = Index.open(root, create=True)
    if idx.count() == n_videos:
        return root
    builder, dim, lp = ZeroShotPrototypes(), encoder.dim, 30
    rng = np.random.default_rng(seed)
    with idx.lock():
        if idx.encoder_spec is None:
            idx.bind(encoder.spec(), builder.spec(), dim)
        schema = schemas(dim, dim)[0]
        stamps = (np.arange(FRAMES, dtype=np.float32) + 0.5) / 3.0
        for lo in range(0, n_videos, CHUNK):
            rows = []
            for v in range(lo, min(n_videos, lo + CHUNK)):
                protos = rng.standard_normal((2, lp, dim)).astype(np.float32)
                protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
                attn = rng.dirichlet(np.full(FRAMES, 0.3), size=(2, lp)).astype(np.float32)
                rows.append({"path": f"/videos/{v // 1000:03d}/video{v:06d}.mp4", "size": 1 << 20, "mtime": 0.0,
                             "content_hash": f"{v:032x}", "duration": FRAMES / 3.0, "fps": 3.0, "native_fps": 30.0,
                             "width": 640, "height": 360, "n_frames": FRAMES, "timestamps": stamps,
                             "proto_clip": protos[0], "proto_frame": protos[1], "attn_clip": attn[0].ravel(),
                             "attn_frame": attn[1].ravel(), "encoder": encoder.spec()["fingerprint"],
                             "builder": builder.spec()["fingerprint"], "ingested_at": time.time()})
            if lo == 0:
                idx.recreate_videos_table(rows)
            else:
                idx.videos.add(to_table(rows, schema))
            if progress:
                progress(f"  {min(n_videos, lo + CHUNK)}/{n_videos} synthetic videos written")
        idx.optimize(grace=0)
        export_text_tower(encoder, idx.root)
    return root


# A small launcher starts each search, so the child's peak resident memory is its own (a child forked from
# this process would start with this process's pages, torch and all, counted).
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
sys.stderr.write(proc.stderr.read().decode(errors="replace")[-300:])
print(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss)
"""


def timed_search(index: Path, query: str, env: dict) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one `prvr search` process."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "prvr_cli", "search", query,
                           "--index", str(index), "-k", "10", "--json"], capture_output=True, text=True, env=env)
    code, wall, peak_kib = done.stdout.split()
    if done.returncode != 0 or code != "0":
        raise RuntimeError(f"prvr search failed ({code}): {done.stderr.strip()[-300:]}")
    return float(wall), int(peak_kib) / 1024.0


def bench_end_to_end(sizes: list[int], clip_model: str, clip_pretrained: str, folder: Path, repeats: int = 5,
                     progress=None) -> dict:
    """Cold-process `prvr search` wall time and peak memory per corpus size, on synthetic indexes in `folder`."""
    from ..pipeline.encode import FrameTextEncoder

    say = progress or (lambda s: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = FrameTextEncoder.load(clip_model, clip_pretrained, "cpu")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cells = []
    for n in sizes:
        root = Path(folder) / f"{encoder.spec()['fingerprint']}-{n}"
        say(f"synthetic index of {n} videos at {root}")
        synthetic_index(root, n, encoder, progress=say)
        timed_search(root, QUERIES[0], env)   # warms the file cache (and builds the search cache if missing)
        runs = [timed_search(root, QUERIES[i % len(QUERIES)], env) for i in range(repeats)]
        walls, peaks = [r[0] for r in runs], [r[1] for r in runs]
        cells.append({"n_videos": n, "runs": repeats, "median_wall_s": round(statistics.median(walls), 3),
                      "max_wall_s": round(max(walls), 3), "peak_rss_mib": round(max(peaks), 1),
                      "cache_mib": round(sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
                                         / 2 ** 20, 1), "load_average": load_average()})
        say(f"  {n} videos: median {cells[-1]['median_wall_s']} s, peak {cells[-1]['peak_rss_mib']} MiB")
    return {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "dim": encoder.dim,
            "machine": machine(), "cells": cells}
