"""CLIP's text tower and ProtoPRVR's query branch in numpy, from weights exported at ingest (`pipeline.text_side`).

Both compute in float32, from float32 weights memory-mapped in place. The text tower attends causally, so the
features of a query's tokens up to its end token do not depend on the padding after it: each
batch runs only as far as its longest query.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Abramowitz & Stegun 7.1.26: erf to 1.5e-7 absolute, enough for float32 GELU
_P, _A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + _P * x)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    return sign * (1.0 - poly * np.exp(-x * x))


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476))),
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "relu": lambda x: np.maximum(x, 0.0),
}


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.exp(x - x.max(axis, keepdims=True))
    return x / x.sum(axis, keepdims=True)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def self_attention(x: np.ndarray, w: dict, prefix: str, heads: int, bias: np.ndarray | None) -> np.ndarray:
    """torch.nn.MultiheadAttention over x [B, L, D] with its packed in-projection; `bias` [L, L] is added to scores."""
    B, L, D = x.shape
    qkv = x @ w[prefix + "in_proj_weight"].T + w[prefix + "in_proj_bias"]
    q, k, v = (t.reshape(B, L, heads, D // heads).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(D // heads))
    if bias is not None:
        scores = scores + bias
    out = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, L, D)
    return out @ w[prefix + "out_proj.weight"].T + w[prefix + "out_proj.bias"]


class Weights(dict):
    """Tensors of a safetensors file by name, as read-only views of the memory-mapped file (no copy: pages are read
    when first used, and a query touches only its own rows of the token embedding)."""

    @classmethod
    def load(cls, path: Path) -> "Weights":
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        n = int(raw[:8].view("<u8")[0])
        header = json.loads(raw[8:8 + n].tobytes())
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            if info["dtype"] != "F32":
                raise ValueError(f"{path}: tensor {name} is {info['dtype']}, not float32")
            tensors[name] = raw[8 + n + lo:8 + n + hi].view(np.float32).reshape(info["shape"])
        return cls(tensors)


class TextTower:
    """open_clip's CLIP text transformer (pre-norm blocks, causal attention, features at the end token)."""

    def __init__(self, folder: Path):
        self.config = json.loads((folder / "clip_text.json").read_text())
        self.weights = Weights.load(folder / "clip_text.safetensors")
        self.act = ACTIVATIONS[self.config["activation"]]

    def _token_states(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected token features [B, L, E] (not normalised) up to the longest query, and each end position [B]."""
        cfg, w = self.config, self.weights
        ends = ids.argmax(-1)                                    # the end token has the largest id
        L = int(ends.max()) + 1
        ids = ids[:, :L]
        x = w["token_embedding"][ids].astype(np.float32) + w["positional_embedding"][:L]
        causal = np.triu(np.full((L, L), -np.inf, dtype=np.float32), 1)
        eps = cfg["eps"]
        for i in range(cfg["layers"]):
            p = f"blocks.{i}."
            x = x + self_attention(layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps), w, p + "attn.",
                                   cfg["heads"], causal)
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            x = x + self.act(h @ w[p + "c_fc.weight"].T + w[p + "c_fc.bias"]) @ w[p + "c_proj.weight"].T \
                + w[p + "c_proj.bias"]
        x = layer_norm(x, w["ln_final.weight"], w["ln_final.bias"], eps)
        if "text_projection" in w:
            x = x @ w["text_projection"]
        return x, ends

    def pooled(self, ids: np.ndarray) -> np.ndarray:
        """L2-normalised features at each query's end token [B, E] (open_clip's `encode_text`)."""
        x, ends = self._token_states(ids)
        return normalize(x[np.arange(len(ids)), ends])

    def per_token(self, ids: np.ndarray) -> list[np.ndarray]:
        """Per query, L2-normalised features [n, E] of its tokens from the start token through the end token."""
        x, ends = self._token_states(ids)
        x = normalize(x)
        return [x[i, : e + 1] for i, e in enumerate(ends.tolist())]


class QueryBranch:
    """ProtoPRVR's query side: input projection, positions, one post-norm encoder layer, one pooling per branch."""

    def __init__(self, folder: Path):
        self.config = json.loads((folder / "query_branch.json").read_text())
        self.weights = Weights.load(folder / "query_branch.safetensors")

    def __call__(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query's token features [n, E] -> its L2-normalised (clip, frame) vectors."""
        cfg, w, eps = self.config, self.weights, 1e-5
        x = tokens[: cfg["max_query_tokens"]].astype(np.float32)
        if cfg.get("encoder") == "mean":   # model.query_encoder 'mean': a linear map of the normalised mean token
            mean = normalize(x.mean(0))
            return tuple(normalize(mean @ w[f"mean.{b}.weight"].T + w[f"mean.{b}.bias"]) for b in ("clip", "frame"))
        x = np.maximum(layer_norm(x, w["proj.norm.weight"], w["proj.norm.bias"], eps) @ w["proj.linear.weight"].T
                       + w["proj.linear.bias"], 0.0)
        x = layer_norm(x + w["positions"][: len(x)], w["positions.norm.weight"], w["positions.norm.bias"], eps)[None]
        x = layer_norm(x + self_attention(x, w, "encoder.self_attn.", cfg["heads"], None),
                       w["encoder.norm1.weight"], w["encoder.norm1.bias"], eps)
        ff = np.maximum(x @ w["encoder.linear1.weight"].T + w["encoder.linear1.bias"], 0.0)
        x = layer_norm(x + ff @ w["encoder.linear2.weight"].T + w["encoder.linear2.bias"],
                       w["encoder.norm2.weight"], w["encoder.norm2.bias"], eps)[0]
        pooled = []
        for branch in ("clip", "frame"):
            attention = softmax(x @ w[f"pool.{branch}.weight"][0] + w[f"pool.{branch}.bias"][0])
            pooled.append(normalize(attention @ x))
        return pooled[0], pooled[1]
