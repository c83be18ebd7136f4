"""Storage types for stored vectors: float32, float16, bfloat16 (what the search cache holds), and int8 with one
scale per vector.

int8 is symmetric per vector: scale = max|x| / 127, q = round(x / scale) in [-127, 127],
x ~ q * scale. The scale is kept alongside as float32 (4 bytes per vector), so the
absolute error of every element is at most scale / 2. Scoring can run directly
on int8: each block of int8 rows is widened to float32, multiplied with the
queries, and the products are multiplied by the rows' scales (the scale of a row
factors out of its dot products, so this equals dequantize-then-score).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..index.matrices import from_bfloat16, to_bfloat16

KINDS = ("float32", "float16", "bfloat16", "int8")
ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
           "bf16": "bfloat16"}
BLOCK_ROWS = 1 << 18  # rows widened to float32 at once by int8_max_prototype_scores


def check_kind(kind: str) -> str:
    """The canonical name of a storage type, or a UsageError naming the choices."""
    canonical = ALIASES.get(kind, kind)
    if canonical not in KINDS:
        raise UsageError(f"storage type {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return canonical


@dataclass
class Int8Vectors:
    """int8 codes [..., D] and their float32 scales [...] (one per vector)."""

    codes: np.ndarray
    scales: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes)


@dataclass
class BFloat16Vectors:
    """bfloat16 bit patterns (uint16) [N, L, D], scanned like the search cache: widened block by block."""

    bits: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    @property
    def shape(self) -> tuple:
        return self.bits.shape

    def blocks(self, rows: int):
        per_block = max(1, rows // self.bits.shape[1])
        for v0 in range(0, self.bits.shape[0], per_block):
            yield v0, from_bfloat16(self.bits[v0:v0 + per_block])


def quantize_int8(x: np.ndarray) -> Int8Vectors:
    """Symmetric per-vector int8 of x [..., D]; an all-zero vector gets scale 1 and codes 0."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=-1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[..., None]), -127, 127).astype(np.int8)
    return Int8Vectors(codes, scales)


def dequantize_int8(v: Int8Vectors) -> np.ndarray:
    return v.codes.astype(np.float32) * v.scales[..., None]


def encode(x: np.ndarray, kind: str):
    """Stored form of x [..., D]: an array (float32/float16) or Int8Vectors."""
    kind = check_kind(kind)
    if kind == "int8":
        return quantize_int8(x)
    if kind == "bfloat16":
        return BFloat16Vectors(to_bfloat16(x))
    return np.asarray(x, dtype=np.float32 if kind == "float32" else np.float16)


def decode(stored) -> np.ndarray:
    """float32 vectors back from a stored form."""
    if isinstance(stored, Int8Vectors):
        return dequantize_int8(stored)
    if isinstance(stored, BFloat16Vectors):
        return from_bfloat16(stored.bits)
    return np.asarray(stored, dtype=np.float32)


def roundtrip(x: np.ndarray, kind: str) -> np.ndarray:
    return decode(encode(x, kind))


def stored_nbytes(stored) -> int:
    return stored.nbytes if isinstance(stored, (Int8Vectors, BFloat16Vectors)) else int(np.asarray(stored).nbytes)


def bytes_per_vector(dim: int, kind: str) -> int:
    """Bytes one stored vector of `dim` elements takes (int8 includes its float32 scale)."""
    kind = check_kind(kind)
    return {"float32": 4 * dim, "float16": 2 * dim, "bfloat16": 2 * dim, "int8": dim + 4}[kind]


def int8_max_prototype_scores(v: Int8Vectors, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like prvr_cli.index.search.max_prototype_scores, directly on int8: codes [N, Lp, D] with scales [N, Lp].

    Returns (max score [Q, N], argmax prototype [Q, N]) of the dot products of the
    dequantized vectors with the queries [Q, D].
    """
    n, lp, d = v.codes.shape
    flat = v.codes.reshape(n * lp, d)
    scales = v.scales.reshape(n * lp)
    q = np.ascontiguousarray(queries, dtype=np.float32).T
    nq = q.shape[1]
    best = np.empty((nq, n), dtype=np.float32)
    arg = np.empty((nq, n), dtype=np.int32)
    rows = max(lp, (BLOCK_ROWS // lp) * lp)
    for lo in range(0, n * lp, rows):
        block = flat[lo:lo + rows].astype(np.float32) @ q                      # [rows, Q]
        block *= scales[lo:lo + rows, None]
        block = block.T.reshape(nq, -1, lp)
        v0 = lo // lp
        best[:, v0:v0 + block.shape[1]] = block.max(-1)
        arg[:, v0:v0 + block.shape[1]] = block.argmax(-1)
    return best, arg


def quantize_encoding(enc, kind: str):
    """A VideoEncoding whose stored vectors (clip, frame) went through storage type `kind` and back.

    Masks and attention are kept as they are; the dtype and device of the vectors are kept,
    so the result scores with the model's own `score` (for SumR per storage type).
    """
    import torch

    from ..nets.retrieval import VideoEncoding

    kind = check_kind(kind)

    def rt(t: torch.Tensor) -> torch.Tensor:
        if kind == "float32":
            return t
        back = roundtrip(t.detach().float().cpu().numpy(), kind)
        return torch.from_numpy(back).to(device=t.device, dtype=t.dtype)

    return VideoEncoding(rt(enc.clip), enc.clip_mask, rt(enc.frame), enc.frame_mask, enc.clip_attn, enc.frame_attn)
