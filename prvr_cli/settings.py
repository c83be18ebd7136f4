"""Where things live and how a setting is chosen.

Precedence, highest first: command-line flag, environment variable `PRVR_<NAME>`,
the config file (`$XDG_CONFIG_HOME/prvr/config.toml`, keys named like the flags
with underscores: `index = "/data/prvr"`), then the built-in default.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tomllib

from .errors import UsageError


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "prvr"


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "prvr"


def runtime_dir() -> Path:
    """Where a running `prvr serve` leaves its socket: $XDG_RUNTIME_DIR/prvr, else a private folder in /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "prvr" if base and os.path.isabs(base) else Path("/tmp") / f"prvr-{os.getuid()}"


def config_path() -> Path:
    explicit = os.environ.get("PRVR_CONFIG")
    return Path(explicit) if explicit else _xdg("XDG_CONFIG_HOME", ".config") / "prvr" / "config.toml"


DEFAULTS = {
    "index": lambda: str(data_home() / "index"),
    "device": lambda: "auto",
    "clip_model": lambda: "ViT-B-32",
    "clip_pretrained": lambda: "openai",
    "fps": lambda: 3.0,
    "workers": lambda: min(4, os.cpu_count() or 1),
    "batch_size": lambda: 64,
    "top_k": lambda: 10,
    "decoder": lambda: "auto",
    "candidates": lambda: "auto",
}
# Settings a config file may hold: those above, and the trained model (no default: zero-shot prototypes).
KNOWN = sorted([*DEFAULTS, "model", "ray"])


@lru_cache(maxsize=None)
def _config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        values = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {p} is not valid TOML ({e}); fix or remove it") from e
    unknown = sorted(set(values) - set(KNOWN))
    if unknown:
        raise UsageError(f"config file {p}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    return values


def given(name: str, flag=None, cast=str):
    """The value of setting `name` from the flag, else PRVR_NAME, else the config file; None when none sets it."""
    if flag is not None:
        return flag
    source, value = f"PRVR_{name.upper()}", os.environ.get(f"PRVR_{name.upper()}")
    if value is None or value == "":
        source, value = f"{config_path()}:{name}", _config_file(str(config_path())).get(name)
    if value is None:
        return None
    try:
        return cast(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source} = {value!r} is not a valid {cast.__name__}") from e


def resolve(name: str, flag=None, cast=str):
    """The value of setting `name`: flag, else PRVR_NAME, else config file, else the built-in default."""
    value = given(name, flag, cast)
    return value if value is not None else DEFAULTS[name]()
