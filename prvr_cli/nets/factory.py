"""The model zoo: declarative configs in `models/` turned into models, and checkpoints.

A config is a JSON file named after its preset (`models/protoprvr_anet.json`):

    {"method": "protoprvr", "model": {...hyper-parameters...}, "train": {...optimiser...}}

`create_model("protoprvr_anet", video_dim=512, text_dim=384)` builds it; the feature
dims always come from the data. Presets are looked up by name in the zoo folders,
or read from a path ending in `.json`.
"""
from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

from ..errors import CorruptError, UsageError
from .config import TrainConfig

# method name -> "module:Class" (imported lazily: only the chosen method is loaded)
METHODS = {
    "protoprvr": "prvr_cli.nets.protoprvr:ProtoPRVR",
    "mssl": "prvr_cli.nets.mssl:MSSL",
    "gmmformer": "prvr_cli.nets.gmmformer:GMMFormer",
    "gmmformer2": "prvr_cli.nets.gmmformer2:GMMFormerV2",
    "msc": "prvr_cli.nets.gmmformer2:MSC",
}

CHECKPOINT_FORMAT = 1

SECTIONS = ("method", "preset", "model", "train")


def canonical(config: dict) -> dict:
    """The config with every section complete and in today's names; refuses an unknown section or key.

    Checked before any data is loaded, so a typo never trains a default model. Checkpoints store
    this form, so an older checkpoint's config reads the same as a new one's.
    """
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise UsageError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    method = config.get("method")
    if method not in METHODS:
        raise UsageError(f"config names method {method!r}; known methods: {', '.join(METHODS)}")
    model = model_class(method).Config.from_dict(config.get("model"), f"{method} model")
    train = TrainConfig.from_dict(config.get("train"), "train")
    return {**config, "model": model.as_dict(), "train": train.as_dict()}


def zoo_dirs() -> list[Path]:
    """Folders holding model configs: the packaged copy, then the source checkout's `models/`."""
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package / "models", package.parent / "models") if d.is_dir()]


def list_presets() -> list[str]:
    names = {p.stem for d in zoo_dirs() for p in d.glob("*.json")}
    return sorted(names)


def load_config(name_or_path: str | Path) -> dict:
    """Read a preset by name (`protoprvr_anet`) or a config file by path."""
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.exists():
        candidates = [d / f"{name_or_path}.json" for d in zoo_dirs()]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise UsageError(f"unknown model preset {str(name_or_path)!r}; choose one of: {', '.join(list_presets())} "
                             "or pass a path to a .json config")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read model config {path}: {e}") from e
    if config.get("method") not in METHODS:
        raise UsageError(f"model config {path} names method {config.get('method')!r}; "
                         f"known methods: {', '.join(METHODS)}")
    config.setdefault("model", {})
    config.setdefault("train", {})
    config["preset"] = config.get("preset", path.stem)
    return config


def override(config: dict, overrides: dict | None) -> dict:
    """A copy of `config` with dotted keys replaced: {"model.n_prototypes": 10}."""
    config = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def model_class(method: str):
    module, cls = METHODS[method].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(config: dict | str, video_dim: int, text_dim: int):
    """Instantiate the method named by `config` (a preset name or a config dict) for the given feature dims."""
    if not isinstance(config, dict):
        config = load_config(config)
    config = canonical(config)
    cls = model_class(config["method"])
    model = cls(video_dim=video_dim, text_dim=text_dim, cfg=config["model"])
    model.config = config
    return model


def save_checkpoint(path: str | Path, model, *, feature_source: dict, metrics: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write a checkpoint that carries everything needed to rebuild and check the model."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        "method": model.config["method"],
        "config": model.config,
        "dims": {"video": model.video_dim, "text": model.text_dim},
        "feature_source": feature_source,
        "metrics": metrics or {},
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: str | Path, map_location="cpu"):
    """Rebuild a model from a checkpoint; returns (model in eval mode, payload without weights)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} not found; pass the .pt file written by `prvr train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise CorruptError(f"checkpoint {path} is unreadable ({type(e).__name__}); retrain or copy it again") from e
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise CorruptError(f"{path} is not a prvr checkpoint (no config/state_dict); pass a file written by `prvr train`")
    if payload.get("format", 0) > CHECKPOINT_FORMAT:
        raise CorruptError(f"checkpoint {path} has format {payload['format']}, newer than this prvr understands "
                           f"({CHECKPOINT_FORMAT}); upgrade prvr")
    dims = payload["dims"]
    model = create_model(payload["config"], video_dim=dims["video"], text_dim=dims["text"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CorruptError(f"checkpoint {path} does not match its own config: {str(e).splitlines()[0]}") from e
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer")}
    meta["config"] = model.config  # complete, in today's key names
    return model, meta
