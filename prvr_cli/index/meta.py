"""index.json: the format version of an index folder, and the encoder and prototype builder that made it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CorruptError

FORMAT_VERSION = 1
META_FILE = "index.json"
TEXT_FOLDER = "text"   # the query side exported for torch-free search (prvr_cli.pipeline.text_side)


def read_meta(root: Path) -> dict:
    meta_path = root / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptError(f"{meta_path} is unreadable ({e}); restore it from a backup or re-ingest") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CorruptError(f"{meta_path} is not a prvr index description; restore it or re-ingest")
    if meta["format"] > FORMAT_VERSION:
        raise CorruptError(f"index {root} has format {meta['format']}, written by a newer prvr "
                           f"(this one reads {FORMAT_VERSION}); upgrade prvr")
    return meta


def write_meta(root: Path, meta: dict, exclusive: bool = False) -> bool:
    """Write index.json atomically; with `exclusive`, only if none exists (returns False if one did)."""
    tmp = root / f"{META_FILE}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, root / META_FILE)
            return True
        try:
            os.link(tmp, root / META_FILE)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def read_text_config(root: Path, name: str) -> dict | None:
    """`text/NAME.json` of an index (the exported query side), or None when it is absent or unreadable."""
    try:
        return json.loads((root / TEXT_FOLDER / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def describe_builder(spec: dict | None) -> str:
    if not spec:
        return "nothing"
    if spec.get("kind") == "zero-shot":
        return "the zero-shot CLIP builder (no --model)"
    return f"model {spec.get('checkpoint')} ({spec.get('method')})"
