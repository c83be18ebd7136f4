"""`prvr train`: train a retrieval model on pre-extracted features or on your own ingested videos."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from ..nets.factory import canonical, load_config, override
from .options import FeatureOpt, PresetOpt, SetOpt, TrainDeviceOpt
from .output import write_line


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
    preset: str = PresetOpt,
    data: Optional[Path] = typer.Option(None, "--data", help="Root of a pre-extracted dataset (h5 or MS-SL layout)."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Collection under --data, e.g. anet, tvr."),
    feature: str = FeatureOpt,
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
    device: str = TrainDeviceOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    sets: List[str] = SetOpt,
    proxy_head: Optional[Path] = typer.Option(
        None, "--proxy-head", help="Add a text-proxy re-ranking head to this trained checkpoint (base frozen); "
        "writes --out/proxy.pt for `prvr search --rerank K`. --set proxy.KEY=VALUE sets the head."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
) -> None:
    """Train a model; progress on stderr, checkpoints and metrics.json in --out."""
    from ..training.loop import train

    _check_sources(data, collection, index, captions)
    if train_videos is not None and train_videos < 2:
        raise UsageError(f"--train-videos {train_videos}: use at least 2 videos (or leave it out for all)")
    config = None if proxy_head is not None else _config(preset, sets, epochs, batch_videos, lr)
    dataset = _dataset(data, collection, feature, text_feature, index, captions, seed).with_train_subset(
        train_videos, seed)
    if proxy_head is not None:
        summary = _train_proxy(proxy_head, sets, out, epochs, batch_videos, lr, seed, device, dataset)
        if as_json:
            write_line(json.dumps(summary))
        return
    summary = train(config, dataset, out, device=device, seed=seed, resume=resume)
    if as_json:
        write_line(json.dumps({k: summary[k] for k in ("run_dir", "preset", "method", "device", "seed", "epochs",
                                                       "best_epoch", "val", "test", "seconds_per_epoch",
                                                       "checkpoints")}))


def _config(preset: str, sets: list[str], epochs, batch_videos, lr) -> dict:
    """The preset with --set and the schedule flags applied; an unknown key is refused before any data loads."""
    overrides = parse_sets(sets)
    for flag, key, value in (("--epochs", "train.max_epochs", epochs), ("--batch-videos", "train.batch_videos",
                                                                         batch_videos), ("--lr", "train.lr", lr)):
        if value is not None:
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
            overrides[key] = value
    return canonical(override(load_config(preset), overrides))


def _check_sources(data, collection, index, captions) -> None:
    """Exactly one source of training data, with what it needs."""
    if index is not None and data is not None:
        raise UsageError("pass either --data (pre-extracted features) or --index with --captions, not both")
    if index is not None and captions is None:
        raise UsageError("--index needs --captions FILE.jsonl with one {\"video\", \"caption\"} object per line")
    if data is not None and not collection:
        raise UsageError("--data needs --collection NAME (the folder under --data, e.g. anet)")
    if index is None and data is None:
        raise UsageError("nothing to train on: pass --data DIR --collection NAME, or --index DIR --captions FILE")


def _dataset(data, collection, feature, text_feature, index, captions, seed: int):
    """Pre-extracted features (--data/--collection) or own videos (--index/--captions)."""
    from ..training.feature_layouts import load_features
    from ..training.own_videos import load_index

    if index is not None:
        return load_index(index, captions, seed=seed)
    return load_features(data, collection, feature, text_feature=text_feature, seed=seed)


def _train_proxy(checkpoint: Path, sets: list[str], out: Path, epochs, batch_videos, lr, seed: int, device: str,
                 dataset) -> dict:
    """`prvr train --proxy-head`: only proxy.KEY settings apply; the base model's own data source is given again."""
    from ..devices import resolve_device
    from ..training.proxy import train_proxy_head

    overrides = parse_sets(sets)
    wrong = sorted(k for k in overrides if not k.startswith("proxy."))
    if wrong:
        raise UsageError(f"--proxy-head takes only --set proxy.KEY=VALUE, not {', '.join(wrong)}")
    for flag, value in (("--epochs", epochs), ("--batch-videos", batch_videos), ("--lr", lr)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    return train_proxy_head(checkpoint, dataset, out, epochs=epochs or 5, batch_videos=batch_videos or 32,
                            lr=lr or 1e-4, device=resolve_device(device), seed=seed,
                            overrides={k.split(".", 1)[1]: v for k, v in overrides.items()},
                            log=lambda line: print(line, file=sys.stderr, flush=True))
