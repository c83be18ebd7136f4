"""Own videos: frame features from a `prvr ingest` index and captions from a JSON Lines file.

The captions are encoded with the index's own CLIP text tower, so the model trains in the space
the index searches in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .datasets import PRVRData, assemble, carve_val


def read_caption_jsonl(path: Path) -> list[dict]:
    """Records {"video", "caption", optional "start", "end"} of a JSON Lines captions file.

    A line may also name its video as "file" and carry several captions as "captions": [text, ...];
    such a line becomes one record per caption (none for an empty list: a video with no caption yet).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read captions {path}: {e}") from e
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        rec = rec if isinstance(rec, dict) else {}
        video = rec.get("video", rec.get("file"))
        texts = rec["captions"] if isinstance(rec.get("captions"), list) else [rec.get("caption")]
        if not isinstance(video, str) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f'{path}:{n}: expected {{"video": path, "caption": text}} or '
                            f'{{"file": path, "captions": [text, ...]}}, got {line[:80]}')
        for key in ("start", "end"):
            if key in rec and not isinstance(rec[key], (int, float)):
                raise DataError(f"{path}:{n}: {key!r} must be a number of seconds, got {rec[key]!r}")
        extra = {k: rec[k] for k in ("start", "end") if k in rec}
        records += [{"video": video, "caption": text, "line": n, **extra} for text in texts]
    if not records:
        raise DataError(f"captions file {path} has no captions; write one JSON object per line")
    return records


def load_index(index_dir: Path, captions_file: Path, seed: int = 0, val_fraction: float = 0.1,
               encoder=None) -> PRVRData:
    """Own videos: frame features from a `prvr ingest` index, captions encoded with its CLIP model.

    `encoder` (anything with `encode_text_tokens(list[str])`) defaults to the index's own CLIP.
    """
    from ..index.store import Index

    captions_file = Path(captions_file)
    records = read_caption_jsonl(captions_file)
    idx = Index.open(index_dir)
    spec = idx.encoder_spec
    features = {str(Path(p).resolve()): feats.astype(np.float32) for p, _, feats in idx.iter_frame_features()}
    if not spec or not features:
        raise DataError(f"index {index_dir} holds no frame features; run `prvr ingest` first")

    match = VideoMatcher(captions_file, idx, features)
    caps = [(f"{video}#enc#{n}", video, rec["caption"].strip())
            for n, rec in enumerate(records) for video in [match(rec["video"], rec["line"])]]
    train, val = carve_val(caps, seed, val_fraction)

    if encoder is None:
        from ..pipeline.encode import FrameTextEncoder

        src = spec.get("source") or spec
        encoder = FrameTextEncoder.load(src["clip_model"], src["clip_pretrained"] or "none", device="cpu")
    texts = [t for _, _, t in caps]
    token_list = [a for i in range(0, len(texts), 256) for a in encoder.encode_text_tokens(texts[i:i + 256])]
    tokens = {c: np.asarray(a, dtype=np.float32) for (c, _, _), a in zip(caps, token_list)}
    used = {v for _, v, _ in caps}
    source = {"layout": "index", "index": str(Path(index_dir).resolve()), "captions": str(captions_file.resolve()),
              "collection": Path(index_dir).resolve().name, "feature": spec.get("clip_model"),
              "clip_model": spec.get("clip_model"), "clip_pretrained": spec.get("clip_pretrained"),
              "encoder_fingerprint": spec.get("fingerprint")}
    return assemble({"train": train, "val": val}, {v: features[v] for v in used}, tokens, source,
                    str(index_dir), str(captions_file))


class VideoMatcher:
    """Finds the indexed video a captions line names, so captions survive a copy or move of the library.

    In order: the path itself (relative paths are relative to the captions file's folder), then a file at that
    path with the same content as an indexed video, then the only indexed video with that file name.
    """

    def __init__(self, captions_file: Path, index, features: dict):
        self.captions_file, self.index, self.features = captions_file, index, features
        self.by_hash: dict[str, str] = {}
        for path, (_, _, digest) in sorted(index.file_states().items()):
            resolved = str(Path(path).resolve())
            if resolved in features:
                self.by_hash.setdefault(digest, resolved)
        self.by_name: dict[str, list[str]] = {}
        for path in sorted(features):
            self.by_name.setdefault(Path(path).name, []).append(path)

    def __call__(self, raw: str, line: int) -> str:
        from ..pipeline.discover import content_hash

        path = Path(raw).expanduser()
        resolved = (path if path.is_absolute() else self.captions_file.parent / path).resolve()
        if str(resolved) in self.features:
            return str(resolved)
        if resolved.is_file():
            try:
                found = self.by_hash.get(content_hash(resolved))
            except OSError:
                found = None
            if found:
                return found
        named = self.by_name.get(resolved.name, [])
        if len(named) == 1:
            return named[0]
        where = f"{self.captions_file}:{line}: video {raw!r} ({resolved})"
        if named:
            raise DataError(f"{where} is not in index {self.index.root}, and {len(named)} indexed videos are named "
                            f"{resolved.name}; give the path it was ingested under")
        raise DataError(f"{where} is not in index {self.index.root}, and no indexed video has its content or its "
                        "file name; ingest it first")


