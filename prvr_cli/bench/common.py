"""What every benchmark shares: the stored shape of each method, timing, the machine and its load.

Shapes come from the methods' own defaults (prototypes per branch, hidden size, clip tokens), so the
benchmarks measure what the models would store.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..nets.gmmformer import GMMFormerConfig
from ..nets.mssl import MSSLConfig
from ..nets.protoprvr import ProtoPRVRConfig
from . import quantize

PROTOPRVR, MSSL, GMMFORMER = ProtoPRVRConfig(), MSSLConfig(), GMMFormerConfig()
DIM = PROTOPRVR.hidden_size                 # every method's default joint space (384)
N_PROTOTYPES = PROTOPRVR.n_prototypes       # per branch (30)
N_CLIPS = MSSL.n_clips                      # clip tokens of the baselines (32)
METHODS = ("protoprvr", "mssl", "gmmformer")
WEIGHTS = (PROTOPRVR.clip_weight, PROTOPRVR.frame_weight)  # the three methods' defaults agree
assert WEIGHTS == (MSSL.clip_weight, MSSL.frame_weight) == (GMMFORMER.clip_weight, GMMFORMER.frame_weight)
TOP_K = 10


# ------------------------------------------------------------------------------------------ shapes

def stored_layout(method: str, frames: int = 64) -> dict[str, int]:
    """Vectors per video of each stored array, as the benchmark scores them."""
    if method == "protoprvr":
        return {"clip": N_PROTOTYPES, "frame": N_PROTOTYPES}
    if method == "mssl":
        return {"spans": N_CLIPS * (N_CLIPS + 1) // 2, "frame_keys": frames, "frame_values": frames}
    if method == "gmmformer":
        return {"clip": N_CLIPS, "frame": 1}
    raise ValueError(method)


def model_vectors(method: str, frames: int = 64) -> int:
    """Vectors per video the model itself outputs (VideoEncoding), before any search-time precomputation."""
    spans = N_CLIPS * (N_CLIPS + 1) // 2
    return {"protoprvr": 2 * N_PROTOTYPES, "mssl": spans + frames, "gmmformer": N_CLIPS + 1}[method]


def bytes_per_video(method: str, kind: str = "float16", dim: int = DIM, frames: int = 64,
                    as_scored: bool = False) -> int:
    n = sum(stored_layout(method, frames).values()) if as_scored else model_vectors(method, frames)
    return n * quantize.bytes_per_vector(dim, kind)


def matching_flops(method: str, clip_vectors: float, frame_vectors: float, dim: int = DIM) -> float:
    """FLOPs to score one query against one video's stored vectors (a multiply-add counts 2).

    ProtoPRVR and GMMFormer: one dot product per stored vector (the max is not counted).
    MS-SL: one dot product per span, then key-clip-guided attention over the frame tokens
    (a logit and a weighted value per token, keys and values precomputed at ingest) and a cosine.
    """
    if method == "mssl":
        return 2 * dim * clip_vectors + 4 * dim * frame_vectors + 2 * dim
    return 2 * dim * (clip_vectors + frame_vectors)


def random_unit(shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float16) -> np.ndarray:
    """L2-normalised Gaussian vectors (last axis), generated in blocks to bound float32 temporaries."""
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1, shape[-1])
    step = 1 << 18
    for lo in range(0, len(flat), step):
        x = rng.standard_normal((min(step, len(flat) - lo), shape[-1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        flat[lo:lo + len(x)] = x
    return out


def top_k(total: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of the k best videos per query, best first (as search.rank)."""
    k = min(k, total.shape[1])
    top = np.argpartition(-total, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(total, top, 1), axis=1, kind="stable")
    return np.take_along_axis(top, order, 1)


# ------------------------------------------------------------------------------------------ timing

def timed_runs(fn, repeats: int, budget_s: float) -> tuple[list[float], int]:
    """Wall seconds of up to `repeats` runs after one warm-up; fewer when one run is long (budget per cell)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = max(1, min(repeats, int(budget_s // max(first, 1e-9))))
    times = []
    if runs < repeats and first * 2 > budget_s:
        times.append(first)  # a long cell: the warm-up is a run of its own (caches cannot help at this size)
        runs = max(0, runs - 1)
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, len(times)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    import platform

    import torch

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
