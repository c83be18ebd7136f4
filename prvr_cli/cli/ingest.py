"""`prvr ingest` and `prvr reindex`: build an index's prototypes from videos, or again from stored features."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .. import settings
from ..pipeline.decode import resolve_decoder
from ..errors import ExitCode, UsageError
from .options import (ClipModelOpt, ClipPretrainedOpt, DeviceOpt, IndexOpt, ModelOpt, encoder_choice,
                      open_library)
from .output import IngestProgress, native_stderr_silenced, stderr, write_line


def ingest(
    paths: List[Path] = typer.Argument(..., metavar="PATH", help="Video files or folders (searched recursively)."),
    index: Optional[str] = IndexOpt,
    glob: Optional[str] = typer.Option(None, "--glob", help="Only files whose name or relative path matches."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frames sampled per second [default 3]."),
    clip_model: Optional[str] = ClipModelOpt,
    clip_pretrained: Optional[str] = ClipPretrainedOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads [default min(4, cores)]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Frames per encoder batch [default 64]."),
    prune: bool = typer.Option(False, "--prune", help="Forget indexed videos whose files are gone."),
    decode_timeout: Optional[float] = typer.Option(None, "--decode-timeout",
                                                   help="Give up on a file whose decoding takes longer than this many "
                                                   "seconds plus 4 s per second of video; 0: no limit [default 60]."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="auto, decord or pyav [env PRVR_DECODER; default "
                                          "auto: decord when installed, else PyAV]."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Decode and encode on Ray actors (one per "
                                      "--workers; GPU actors where the cluster has GPUs): local (a Ray instance on "
                                      "this machine), auto (the cluster `ray start` joined here) or a cluster "
                                      "address [env PRVR_RAY; needs pip install 'prvr[ray]']."),
    wait: bool = typer.Option(False, "--wait", help="If another prvr process is writing the index, wait for it "
                              "instead of exiting with code 6."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Index videos: decode, encode frames with CLIP, build prototypes, store them."""
    speed = _ingest_speed(fps, workers, batch_size, decode_timeout)
    speed["decoder"] = resolve_decoder(settings.resolve("decoder", decoder))
    speed["ray"] = settings.given("ray", ray) or None
    library = open_library(index, device)
    with IngestProgress(enabled=not quiet and stderr.is_terminal) as progress, native_stderr_silenced():
        report = library.ingest(paths, glob=glob, prune=prune, **speed, **encoder_choice(clip_model, clip_pretrained,
                                                                                          model),
                                wait=_waiting_message if wait else None, progress=progress)
    for path, why in report.found.skipped:
        stderr.print(f"error: {path}: {why}", markup=False, soft_wrap=True)
    if not report.found.files:
        stderr.print(f"error: no video files found under {', '.join(map(str, paths))}", markup=False, soft_wrap=True)
    if report.summary is not None:
        stderr.print(report.summary.line(), markup=False)
        if as_json:
            write_line(json.dumps({"index": str(report.index), **report.summary.as_dict()}))
    if not report.complete:
        raise typer.Exit(ExitCode.PARTIAL)


def _ingest_speed(fps, workers, batch_size, decode_timeout) -> dict:
    """The sampling and parallelism settings, resolved (flag > PRVR_* > config file > default) and checked."""
    fps = settings.resolve("fps", fps, float)
    workers = settings.resolve("workers", workers, int)
    batch_size = settings.resolve("batch_size", batch_size, int)
    if not 0 < fps <= 60:
        raise UsageError(f"--fps {fps}: use a rate between 0 and 60 frames per second")
    if workers < 1 or batch_size < 1:
        raise UsageError("--workers and --batch-size must be at least 1")
    if decode_timeout is not None and decode_timeout < 0:
        raise UsageError(f"--decode-timeout {decode_timeout}: use a number of seconds, or 0 for no limit")
    return {"fps": fps, "workers": workers, "batch_size": batch_size, "decode_timeout": decode_timeout}


def _waiting_message(root, holder: str) -> None:
    stderr.print(f"prvr: index {root} is being written by another prvr process (pid {holder}); waiting for it "
                 "to finish (Ctrl-C to stop)", markup=False, soft_wrap=True)


def reindex(
    model: str = typer.Option(..., "--model", help="Checkpoint from `prvr train`, or zero-shot."),
    index: Optional[str] = IndexOpt,
    device: Optional[str] = DeviceOpt,
):
    """Rebuild every video's prototypes with another model, from stored frame features (no decoding)."""
    with IngestProgress(enabled=stderr.is_terminal) as progress:
        done = open_library(index, device).reindex(model, progress)
    stderr.print(f"rebuilt prototypes of {done['videos']} videos with {done['builder']}", markup=False)
