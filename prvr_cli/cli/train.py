"""`prvr train`: train a retrieval model on pre-extracted features or on your own ingested videos."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from ..nets.factory import canonical, load_config, override


def parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` pairs as config overrides; values are JSON when they parse, else strings."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected key=value, e.g. --set model.losses.attn=0")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def train_command(
    out: Path = typer.Option(..., "--out", help="Run folder: best.pt, last.pt and metrics.json go here."),
    preset: str = typer.Option("protoprvr_anet", "--preset", help="Model preset name or path to a .json config."),
    data: Optional[Path] = typer.Option(None, "--data", help="Root of a pre-extracted dataset (h5 or MS-SL layout)."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Collection under --data, e.g. anet, tvr."),
    feature: str = typer.Option("cg", "--feature", help="Video feature name, e.g. cg (h5) or i3d_resnet (MS-SL)."),
    text_feature: Optional[str] = typer.Option(None, "--text-feature",
                                               help="Token feature file under TextData/ (default: by layout)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Train on your own videos: a `prvr ingest` index."),
    captions: Optional[Path] = typer.Option(None, "--captions",
                                            help='With --index: JSON Lines {"video": path, "caption": text}.'),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (train.max_epochs)."),
    batch_videos: Optional[int] = typer.Option(None, "--batch-videos", help="Videos per step, with all queries."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (train.lr)."),
    train_videos: Optional[int] = typer.Option(None, "--train-videos",
                                               help="Train on a seeded random subset of this many training videos."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, data order and the val hold-out."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    sets: List[str] = typer.Option([], "--set", help="Override a config key, repeatable: model.losses.attn=0"),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
) -> None:
    """Train a model; progress on stderr, checkpoints and metrics.json in --out."""
    from ..training.datasets import load_features, load_index
    from ..training.loop import train

    if index is not None and data is not None:
        raise UsageError("pass either --data (pre-extracted features) or --index with --captions, not both")
    if index is not None and captions is None:
        raise UsageError("--index needs --captions FILE.jsonl with one {\"video\", \"caption\"} object per line")
    if data is not None and not collection:
        raise UsageError("--data needs --collection NAME (the folder under --data, e.g. anet)")
    if index is None and data is None:
        raise UsageError("nothing to train on: pass --data DIR --collection NAME, or --index DIR --captions FILE")
    overrides = parse_sets(sets)
    flags = (("--epochs", "train.max_epochs", epochs), ("--batch-videos", "train.batch_videos", batch_videos),
             ("--lr", "train.lr", lr))
    for flag, key, value in flags:
        if value is not None:
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
            overrides[key] = value
    config = override(load_config(preset), overrides)
    canonical(config)  # an unknown key is refused here, before any data is loaded
    if train_videos is not None and train_videos < 2:
        raise UsageError(f"--train-videos {train_videos}: use at least 2 videos (or leave it out for all)")

    if index is not None:
        dataset = load_index(index, captions, seed=seed)
    else:
        dataset = load_features(data, collection, feature, text_feature=text_feature, seed=seed)
    dataset = dataset.with_train_subset(train_videos, seed)

    summary = train(config, dataset, out, device=device, seed=seed, resume=resume)
    if as_json:
        brief = {k: summary[k] for k in ("run_dir", "preset", "method", "device", "seed", "epochs", "best_epoch",
                                         "val", "test", "seconds_per_epoch", "checkpoints")}
        typer.echo(json.dumps(brief))
