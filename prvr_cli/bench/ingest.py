"""`prvr bench ingest`: frames per second of decoding alone, the image encoder alone, and the full ingest."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .common import load_average, machine


def _decode_all(files: list[Path], fps: float, size: int, workers: int, batch_size: int, keep: bool):
    """Decode with the ingest's own decoders; returns (frames, seconds, decoded arrays or None, errors)."""
    from ..pipeline.ingest import decode_only

    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    frames, errors = decode_only(files, fps, size, workers, max(8, batch_size // 2), kept.append if keep else None)
    seconds = time.perf_counter() - t0
    return frames, seconds, (np.concatenate(kept) if keep and kept else None), errors


def bench_ingest(path: str | Path, clip_model: str = "ViT-B-32", clip_pretrained: str = "none", device: str = "cpu",
                 fps: float = 3.0, workers: int = 2, batch_size: int = 64, profile: bool = False,
                 progress=None) -> dict:
    """Frames/s of decoding alone, the CLIP image encoder alone (pre-decoded frames) and the full ingest."""
    import warnings

    import torch

    from ..pipeline.discover import discover
    from ..pipeline.encode import FrameTextEncoder
    from ..errors import UsageError
    from ..pipeline.ingest import make_plan, run_ingest
    from ..pipeline.prototypes import ZeroShotPrototypes
    from ..index.store import Index

    if not Path(path).exists():
        raise UsageError(f"{path}: no such file or folder; pass a folder of videos")
    if not 0 < fps <= 60:
        raise UsageError(f"--fps {fps}: use a rate between 0 and 60 frames per second")
    if workers < 1 or batch_size < 1:
        raise UsageError("--workers and --batch-size must be at least 1")
    files = discover([Path(path)], None).files
    if not files:
        raise UsageError(f"{path}: no video files found; pass a folder or file of videos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = FrameTextEncoder.load(clip_model, clip_pretrained, device)
    say = progress or (lambda s: None)

    # 1. decoding alone (twice: the first run warms the file cache, the second is reported)
    say("decode alone")
    _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=False)
    n_dec, dec_s, _, errors = _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=False)
    _, _, frames, _ = _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=True)

    # 2. the encoder alone on pre-decoded frames, same batch size (one warm-up batch first)
    say(f"encoder alone on {len(frames)} frames")
    encoder.encode_images(frames[:batch_size])
    t0 = time.perf_counter()
    for lo in range(0, len(frames), batch_size):
        encoder.encode_images(frames[lo:lo + batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    enc_s = time.perf_counter() - t0

    # 3. the full ingest into a temporary index (decode threads + encoder + prototypes + LanceDB)
    say("full ingest")
    builder = ZeroShotPrototypes()
    stats = None
    with tempfile.TemporaryDirectory(prefix="prvr-bench-ingest-") as tmp:
        idx = Index.open(Path(tmp) / "index", create=True)
        with idx.lock():
            enc_spec = encoder.spec()
            idx.bind(enc_spec, builder.spec(), builder.output_dim(enc_spec["dim"]))
            plan = make_plan(files, idx.file_states(), False, workers)
            t0 = time.perf_counter()
            if profile:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            summary = run_ingest(idx, plan, encoder, builder, fps=fps, workers=workers, batch_size=batch_size)
            full_s = time.perf_counter() - t0
            if profile:
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
                stats = buf.getvalue()
            t0 = time.perf_counter()
            idx.optimize()
            optimize_s = time.perf_counter() - t0
    n_full = summary.frames
    res = {
        "files": len(files), "failed": summary.failed, "frames": n_full,
        "decode": {"frames": n_dec, "seconds": round(dec_s, 3), "frames_per_s": round(n_dec / dec_s, 2)},
        "encoder": {"frames": int(len(frames)), "seconds": round(enc_s, 3), "frames_per_s": round(len(frames) / enc_s, 2)},
        "full_ingest": {"frames": n_full, "seconds": round(full_s, 3), "frames_per_s": round(n_full / full_s, 2),
                        "optimize_seconds": round(optimize_s, 3)},
        "ratio_full_over_encoder_time": round((full_s / max(n_full, 1)) / (enc_s / len(frames)), 3),
        "settings": {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "device": encoder.device,
                     "fps": fps, "workers": workers, "batch_size": batch_size, "builder": "zero-shot"},
        "decode_errors": errors, "machine": machine(), "load_average": load_average(),
    }
    if stats:
        res["profile"] = stats
    return res
