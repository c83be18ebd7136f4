"""Options shared by several commands, and opening the library they act on."""
from __future__ import annotations

from typing import Optional

import typer

from .. import settings
from ..library import Library

IndexOpt = typer.Option(None, "--index", help="Index folder, or s3://bucket/folder [env PRVR_INDEX; default "
                        "$XDG_DATA_HOME/prvr/index].")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda [env PRVR_DEVICE; default auto].")
ClipModelOpt = typer.Option(None, "--clip-model", help="open_clip model name or model-config .json "
                            "[env PRVR_CLIP_MODEL; default: the index's, else ViT-B-32].")
ClipPretrainedOpt = typer.Option(None, "--clip-pretrained", help="Pretrained tag, local checkpoint file, or none "
                                 "[env PRVR_CLIP_PRETRAINED; default: the index's, else openai].")
ModelOpt = typer.Option(None, "--model", help="Checkpoint from `prvr train` [env PRVR_MODEL; default: the index's, "
                        "else zero-shot CLIP prototypes].")
JsonOpt = typer.Option(False, "--json", help="As JSON on stdout.")

# training data and configs (prvr train, prvr bench accuracy, prvr bench train)
DataOpt = typer.Option(..., "--data", help="Root of a pre-extracted dataset (h5 or MS-SL layout).")
CollectionOpt = typer.Option(..., "--collection", help="Collection under --data, e.g. anet, tvr.")
FeatureOpt = typer.Option("cg", "--feature", help="Video feature name, e.g. cg (h5) or i3d_resnet (MS-SL).")
PresetOpt = typer.Option("protoprvr_anet", "--preset", help="Model preset name or path to a .json config.")
SetOpt = typer.Option([], "--set", help="Override a config key, repeatable: model.losses.attn=0")
TrainDeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")


def open_library(index: Optional[str], device: Optional[str] = None) -> Library:
    """The library at --index (or PRVR_INDEX, the config file, the XDG default), with the user's cache folder."""
    return Library.open(settings.resolve("index", index or None), cache=settings.cache_home(),
                        device=settings.resolve("device", device))


def encoder_choice(clip_model: Optional[str], clip_pretrained: Optional[str], model: Optional[str]) -> dict:
    """The encoder and model a command was asked for (flag, PRVR_*, config file); None: the index's own."""
    return {"clip_model": settings.given("clip_model", clip_model),
            "clip_pretrained": settings.given("clip_pretrained", clip_pretrained),
            "model": settings.given("model", model)}
