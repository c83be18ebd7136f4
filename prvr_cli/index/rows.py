"""The rows an index stores, as Arrow: one per video in `videos`, one per video's frame features in `frames`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class VideoRecord:
    """Everything stored about one video, except its frame features."""

    path: str
    size: int
    mtime: float
    content_hash: str
    duration: float
    fps: float
    native_fps: float
    width: int
    height: int
    timestamps: np.ndarray      # [T] seconds
    proto_clip: np.ndarray      # [Lp, D]
    proto_frame: np.ndarray     # [Lp, D]
    attn_clip: np.ndarray       # [Lp, T]
    attn_frame: np.ndarray      # [Lp, T]


def sql_str(value: str) -> str:
    """A string literal for a LanceDB filter."""
    return "'" + value.replace("'", "''") + "'"


def schemas(proto_dim: int, feature_dim: int) -> tuple[pa.Schema, pa.Schema]:
    """The videos and frames tables' schemas for prototypes of `proto_dim` and frame features of `feature_dim`."""
    d, c = proto_dim, feature_dim
    multivector = lambda dim: pa.list_(pa.list_(pa.float16(), dim))  # noqa: E731
    videos = pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("content_hash", pa.string()),
        ("duration", pa.float32()), ("fps", pa.float32()), ("native_fps", pa.float32()),
        ("width", pa.int32()), ("height", pa.int32()), ("n_frames", pa.int32()),
        ("timestamps", pa.list_(pa.float32())),
        ("proto_clip", multivector(d)), ("proto_frame", multivector(d)),
        ("attn_clip", pa.list_(pa.float16())), ("attn_frame", pa.list_(pa.float16())),
        ("encoder", pa.string()), ("builder", pa.string()), ("ingested_at", pa.float64()),
    ])
    frames = pa.schema([
        ("path", pa.string()), ("content_hash", pa.string()),
        ("timestamps", pa.list_(pa.float32())), ("features", multivector(c)),
    ])
    return videos, frames


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows of numpy arrays and scalars -> an Arrow table, building list columns without Python lists."""
    columns = []
    for f in schema:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            inner = f.type.value_type
            arrays = [np.asarray(v) for v in values]
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
            if pa.types.is_fixed_size_list(inner):
                leaf = inner.value_type.to_pandas_dtype()
                flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(leaf) if arrays else np.zeros(0, leaf)
                child = pa.FixedSizeListArray.from_arrays(pa.array(flat), inner.list_size)
            else:
                leaf = inner.to_pandas_dtype()
                child = pa.array(np.concatenate(arrays).astype(leaf) if arrays else np.zeros(0, leaf))
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), child).cast(f.type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)
