"""Typed configs: each method's model section and the training section are dataclasses built from a preset.

A preset (`models/*.json`) is `{"method", "model": {...}, "train": {...}}`. `Settings.from_dict` builds the
dataclass from a section, refusing a key it does not know with the known ones listed, so a typo never
trains a default model. Every method names the same thing the same way (`hidden_size`, `n_heads`,
`max_query_tokens`, ...); the older names that ProtoPRVR presets and checkpoints used are read as
their new names (LEGACY_NAMES).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..errors import UsageError

# old key -> its name now (ProtoPRVR presets and checkpoints written before the vocabulary was shared)
LEGACY_NAMES = {"hidden": "hidden_size", "heads": "n_heads", "ff_dim": "ff_size", "max_words": "max_query_tokens"}


@dataclass(frozen=True)
class Settings:
    """A section of a config; subclasses declare its keys as typed fields with their defaults."""

    @classmethod
    def from_dict(cls, values: dict | None, where: str):
        """The section `values` over the defaults; nested sections are dataclasses too."""
        if values is not None and not isinstance(values, dict):
            raise UsageError(f"{where} must be a table of settings ({', '.join(cls.keys())})")
        values = {LEGACY_NAMES.get(k, k) if LEGACY_NAMES.get(k) in cls.keys() else k: v
                  for k, v in (values or {}).items()}
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise UsageError(f"unknown {where} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(cls.keys()))}")
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            kind = hints[key]
            if isinstance(kind, type) and issubclass(kind, Settings):
                values[key] = kind.from_dict(value, f"{where}.{key}")
        return cls(**values)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class BranchModelConfig(Settings):
    """What every method shares: a clip branch over `n_clips` tokens and a frame branch over at most `max_frames`
    frames, in a joint space of `hidden_size`, scored as clip_weight * clip + frame_weight * frame."""

    hidden_size: int = 384
    n_heads: int = 4
    dropout: float = 0.1
    n_clips: int = 32
    max_frames: int = 128
    max_query_tokens: int = 30
    clip_weight: float = 0.7
    frame_weight: float = 0.3
    margin: float = 0.2
    hard_negative_start_epoch: int = 20   # -1: never mine hard negatives
    hard_pool_size: int = 20


@dataclass(frozen=True)
class TrainConfig(Settings):
    """The optimiser and schedule of `prvr train`."""

    optimizer: str = "adamw"
    lr: float = 2.5e-4
    weight_decay: float = 0.01
    warmup: float = 0.01          # share of all steps with a rising learning rate
    schedule: str = "linear"      # or "constant", or "cooldown": constant, then linear decay over the last steps
    cooldown: float = 0.2         # share of all steps the "cooldown" schedule decays over
    batch_videos: int = 128
    max_epochs: int = 100
    patience: int = 10
    grad_clip: float = 1.0
    autocast: str = "off"         # "bf16": forward and backward matrix products in bfloat16 (evaluation stays float32)

    def __post_init__(self):
        if self.optimizer != "adamw":
            raise UsageError(f"train.optimizer {self.optimizer!r} is not supported; use 'adamw'")
        if self.autocast not in ("off", "bf16"):
            raise UsageError(f"train.autocast {self.autocast!r} is not supported; use 'off' or 'bf16'")
        if self.schedule not in ("linear", "constant", "cooldown"):
            raise UsageError(f"train.schedule {self.schedule!r} is not supported; "
                             "use 'linear', 'constant' or 'cooldown'")
        if not 0 < float(self.cooldown) <= 1:
            raise UsageError(f"train.cooldown must be a share of the steps in (0, 1], got {self.cooldown}")
        for key in ("batch_videos", "max_epochs"):
            if int(getattr(self, key)) < 1:
                raise UsageError(f"train.{key} must be at least 1, got {getattr(self, key)}")


# Settings that may change when a run is resumed: they only decide when to stop.
STOP_KEYS = ("max_epochs", "patience")

