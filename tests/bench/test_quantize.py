"""Storage types: round-trip error bounds, int8 scoring on codes, quantize_encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prvr_cli.bench import quantize
from prvr_cli.errors import UsageError
from prvr_cli.nets.retrieval import VideoEncoding
from prvr_cli.index.search import max_prototype_scores


def _vectors(shape, seed=0, scale=1.0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return x


def test_int8_roundtrip_error_is_at_most_half_a_step():
    x = _vectors((50, 7, 64), scale=3.0)
    v = quantize.quantize_int8(x)
    assert v.codes.dtype == np.int8 and v.scales.shape == (50, 7)
    assert np.abs(v.codes).max() <= 127
    err = np.abs(quantize.dequantize_int8(v) - x)
    assert np.all(err <= v.scales[..., None] / 2 + 1e-6)
    # the peak of each vector is represented exactly (up to float rounding)
    peak_idx = np.abs(x).argmax(-1)
    back = np.take_along_axis(quantize.dequantize_int8(v), peak_idx[..., None], -1)[..., 0]
    assert np.allclose(back, np.take_along_axis(x, peak_idx[..., None], -1)[..., 0], rtol=1e-6)


def test_int8_zero_vector_and_float16_bound():
    x = np.zeros((3, 8), np.float32)
    assert np.array_equal(quantize.roundtrip(x, "int8"), x)
    y = _vectors((100, 384))
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    # float16 keeps 11 significant bits: relative error <= 2^-11 for normal numbers
    err = np.abs(quantize.roundtrip(y, "float16") - y)
    assert np.all(err <= np.abs(y) * 2 ** -11 + 6e-8)
    assert np.array_equal(quantize.roundtrip(y, "float32"), y)


def test_bytes_per_vector_and_stored_nbytes_agree():
    x = _vectors((10, 30, 384))
    for kind in quantize.KINDS:
        assert quantize.stored_nbytes(quantize.encode(x, kind)) == 300 * quantize.bytes_per_vector(384, kind)
    assert quantize.bytes_per_vector(384, "int8") == 388
    assert quantize.check_kind("fp16") == "float16"
    with pytest.raises(UsageError, match="int4"):
        quantize.check_kind("int4")


def test_int8_scoring_equals_dequantize_then_score(monkeypatch):
    x = _vectors((40, 5, 32), seed=1)
    q = _vectors((6, 32), seed=2)
    v = quantize.quantize_int8(x)
    ref_best, ref_arg = max_prototype_scores(quantize.dequantize_int8(v), q)
    monkeypatch.setattr(quantize, "BLOCK_ROWS", 15)  # several blocks, one cut inside no video
    best, arg = quantize.int8_max_prototype_scores(v, q)
    assert np.allclose(best, ref_best, atol=1e-5)
    assert np.array_equal(arg, ref_arg)


def test_quantize_encoding_roundtrips_vectors_only():
    enc = VideoEncoding(torch.randn(4, 6, 16), torch.ones(4, 6, dtype=torch.bool), torch.randn(4, 3, 16),
                        torch.tensor([[True, True, False]] * 4), torch.rand(4, 6, 9), None)
    for kind in quantize.KINDS:
        out = quantize.quantize_encoding(enc, kind)
        assert out.clip.shape == enc.clip.shape and out.clip.dtype == enc.clip.dtype
        assert out.clip_mask is enc.clip_mask and out.clip_attn is enc.clip_attn and out.frame_attn is None
        tol = {"float32": 0.0, "float16": 2e-3, "bfloat16": 1.6e-2, "int8": 0.05}[kind]
        assert torch.allclose(out.clip, enc.clip, atol=tol * enc.clip.abs().max().item() + 1e-7)
        assert torch.allclose(out.frame, enc.frame, atol=tol * enc.frame.abs().max().item() + 1e-7)
    assert torch.equal(quantize.quantize_encoding(enc, "float32").clip, enc.clip)
