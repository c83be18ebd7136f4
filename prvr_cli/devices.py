"""Where tensors run: one resolver for every command (ingest, search, train, bench)."""
from __future__ import annotations

from .errors import UsageError


def resolve_device(device: str) -> str:
    """The torch device for `auto`, `cpu`, `cuda` or `cuda:N`: `auto` is cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda")
    return device
