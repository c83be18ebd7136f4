"""`prvr bench search --end-to-end`: the wall time and peak memory of whole `prvr search` commands, cold (no
server) and warm (a `prvr serve` running), and the server's latency under a bounded number of local clients.

Each corpus size gets a synthetic index: a real CLIP encoder's identity and exported text side
(random weights run at the same speed as trained ones), prototypes as random unit vectors, and per-prototype
attention over 60 frames. Zero-shot, the prototypes have the encoder's dimension; with a trained checkpoint they
have the model's (384 for the default preset), and the index carries the checkpoint's exported query branch, so
a search runs the same query side as on a library ingested with `--model`. Nothing about accuracy
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


def synthetic_index(root: Path, n_videos: int, encoder, builder, seed: int = 0, progress=None) -> Path:
    """An index at `root` holding `n_videos` synthetic videos of `builder`'s prototype dimension (made once)."""
    from ..index.rows import schemas, to_table
    from ..index.store import Index
    from ..pipeline.text_side import export_query_branch, export_text_tower

    idx = Index.open(root, create=True)
    if idx.count() == n_videos:
        return root
    dim, lp = builder.output_dim(encoder.dim), 30
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
        if builder.kind == "trained":
            export_query_branch(builder, idx.root)
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


def start_server(index: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A `prvr serve` on `index` at a free port, once it answers; returns the process and its port."""
    import re

    proc = subprocess.Popen([sys.executable, "-m", "prvr_cli", "serve", "--index", str(index), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600
    for line in proc.stderr:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return proc, int(found.group(1))
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("prvr serve did not start")


def load_test(port: int, clients: int, requests: int) -> dict:
    """`clients` threads each sending `requests` searches over HTTP; latency percentiles and errors."""
    import http.client
    import threading
    import urllib.parse

    latencies, errors, lock = [], [0], threading.Lock()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(requests):
            q = urllib.parse.urlencode({"q": QUERIES[(n + i) % len(QUERIES)] + f" {i}", "k": 10})
            start = time.perf_counter()
            try:
                conn.request("GET", f"/api/search?{q}")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                latencies.append(time.perf_counter() - start) if ok else None
                errors[0] += not ok

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1e3 for x in latencies)
    pick = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None  # noqa: E731
    return {"clients": clients, "requests": clients * requests, "errors": errors[0], "p50_ms": pick(0.5),
            "p99_ms": pick(0.99), "per_s": round(len(ms) / wall, 1)}


def scan_against_bandwidth(cache: Path, repeats: int = 7) -> dict:
    """The server's scan of both branches for one query (bfloat16 in memory, torch) against the time to read the
    same bytes once (a sum over them): the memory-bandwidth limit of that scan on this machine."""
    import torch

    from ..index.matrices import PrototypeFile, ResidentPrototypes
    from ..index.search import max_prototype_scores

    branches = [ResidentPrototypes(PrototypeFile(cache / f"proto_{b}.npy")) for b in ("clip", "frame")]
    q = np.random.default_rng(0).standard_normal((1, branches[0].shape[2])).astype(np.float32)
    q /= np.linalg.norm(q)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    scan = median_ms(lambda: [max_prototype_scores(b, q) for b in branches])
    with torch.inference_mode():
        read = median_ms(lambda: [b.values.sum() for b in branches])
    return {"scan_ms": round(scan, 1), "read_ms": round(read, 1), "ratio": round(scan / max(read, 1e-6), 2),
            "torch_threads": torch.get_num_threads(), "bytes": int(sum(b.bits.nbytes for b in branches))}


def bench_end_to_end(sizes: list[int], clip_model: str, clip_pretrained: str, folder: Path, repeats: int = 5,
                     served: bool = True, clients: int = 4, requests: int = 25, checkpoint: Path | None = None,
                     progress=None) -> dict:
    """Cold-process `prvr search` wall time and peak memory per corpus size, on synthetic indexes in `folder`
    (zero-shot, or shaped by a trained ProtoPRVR `checkpoint` of this encoder)."""
    from ..pipeline.encode import FrameTextEncoder
    from ..pipeline.prototypes import load_builder

    say = progress or (lambda s: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = FrameTextEncoder.load(clip_model, clip_pretrained, "cpu")
    builder = load_builder(str(checkpoint) if checkpoint else None, encoder.spec(), "cpu")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_RUNTIME_DIR": str(Path(folder) / "run")}
    cells = []
    for n in sizes:
        root = Path(folder) / f"{encoder.spec()['fingerprint']}-{builder.spec()['fingerprint']}-{n}"
        say(f"synthetic index of {n} videos at {root}")
        synthetic_index(root, n, encoder, builder, progress=say)
        timed_search(root, QUERIES[0], env)   # warms the file cache (and builds the search cache if missing)
        runs = [timed_search(root, QUERIES[i % len(QUERIES)], env) for i in range(repeats)]
        walls, peaks = [r[0] for r in runs], [r[1] for r in runs]
        cell = {"n_videos": n, "runs": repeats, "median_wall_s": round(statistics.median(walls), 3),
                "max_wall_s": round(max(walls), 3), "peak_rss_mib": round(max(peaks), 1),
                "cache_mib": round(sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
                                   / 2 ** 20, 1)}
        say(f"  {n} videos, cold: median {cell['median_wall_s']} s, peak {cell['peak_rss_mib']} MiB")
        cell["scan"] = scan_against_bandwidth(next((root / "cache").glob("videos-v*")))
        say(f"  {n} videos, server scan: {cell['scan']['scan_ms']} ms, reading its bytes {cell['scan']['read_ms']} ms")
        if served:
            server, port = start_server(root, env)
            try:
                warm = [timed_search(root, QUERIES[i % len(QUERIES)], env) for i in range(repeats)]
                cell["served_median_wall_s"] = round(statistics.median(w[0] for w in warm), 3)
                cell["served_peak_rss_mib"] = round(max(w[1] for w in warm), 1)
                cell["load"] = load_test(port, clients, requests)
            finally:
                server.terminate()
                server.wait(30)
            say(f"  {n} videos, served: median {cell['served_median_wall_s']} s; {clients} clients: "
                f"p50 {cell['load']['p50_ms']} ms, p99 {cell['load']['p99_ms']} ms, {cell['load']['errors']} errors")
        cells.append({**cell, "load_average": load_average()})
    return {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "dim": encoder.dim,
            "builder": builder.spec(), "prototype_dim": builder.output_dim(encoder.dim), "machine": machine(),
            "cells": cells}
