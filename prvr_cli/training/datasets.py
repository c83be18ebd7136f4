"""Training data for PRVR: pre-extracted features in three layouts, loaded into one in-memory form.

* `h5` (the cg_prvr benchmark): `{root}/{coll}/FeatureData/{coll}_{feat}.h5` holds one
  `[T, Dv]` dataset per video id, `{root}/{coll}/TextData/{coll}_{feat}.h5` one `[L, Dt]`
  dataset per caption id.
* `mssl` (MS-SL / GMMFormer releases): `{root}/{coll}/FeatureData/{feat}/` holds
  `feature.bin` (raw float32 rows), `id.txt` (one frame id per row), `shape.txt`
  (`n_rows dim`) and `video2frames.txt` (a dict literal: video id -> frame ids); token
  features live in `{root}/{coll}/TextData/roberta_{coll}_query_feat.hdf5`.
* `index` (own videos): frame features from a `prvr ingest` index and captions from a
  JSON Lines file; the captions are encoded with the index's CLIP text tower.

Both feature layouts share the caption files `{root}/{coll}/TextData/{coll}{split}.caption.txt`
with lines `<video_id>#enc#<n> <caption>`. Everything is validated on load: a problem
the user can fix raises `DataError` naming the file or id.

In memory, the features of a split are *packed*: all rows of all videos concatenated
with offsets, so a batch is cut out with one gather and no per-sample Python work.
"""
from __future__ import annotations

import ast
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Packed:
    """Variable-length sequences stored as rows [N_rows, D] plus offsets [n + 1]."""

    rows: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> "Packed":
        lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
        offsets = torch.zeros(len(arrays) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        rows = torch.from_numpy(np.concatenate(arrays, 0).astype(np.float32, copy=False))
        return cls(rows, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded [B, T_max, D] features and [B, T_max] bool mask of the sequences `index`."""
        start, length = self.offsets[index], self.lengths[index]
        t = torch.arange(int(length.max()), dtype=torch.long)
        mask = t.unsqueeze(0) < length.unsqueeze(1)
        rows = torch.where(mask, start.unsqueeze(1) + t.unsqueeze(0), 0)
        return self.rows[rows] * mask.unsqueeze(-1), mask

    def select(self, index: torch.Tensor) -> "Packed":
        """A new Packed holding only the sequences `index`, in that order."""
        start, length = self.offsets[index], self.lengths[index]
        offsets = torch.zeros(len(index) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(length, 0)
        owner = torch.repeat_interleave(torch.arange(len(index)), length)
        rows = start[owner] + torch.arange(int(offsets[-1])) - offsets[:-1][owner]
        return Packed(self.rows[rows], offsets)


@dataclass
class Split:
    """One split: its videos, its queries (grouped by video) and their packed features.

    Queries are sorted by video, so video i owns queries query_offsets[i]:query_offsets[i+1].
    """

    name: str
    video_ids: list[str]
    cap_ids: list[str]
    captions: list[str]
    query_video: torch.Tensor          # [Q] index into video_ids
    frames: Packed                     # one sequence per video
    tokens: Packed                     # one sequence per query
    query_offsets: torch.Tensor = field(init=False)

    def __post_init__(self):
        counts = torch.bincount(self.query_video, minlength=len(self.video_ids))
        self.query_offsets = torch.zeros(len(self.video_ids) + 1, dtype=torch.long)
        self.query_offsets[1:] = torch.cumsum(counts, 0)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    @property
    def n_queries(self) -> int:
        return len(self.cap_ids)

    def subset(self, videos: torch.Tensor) -> "Split":
        """The split restricted to `videos` (indices, kept in that order) with all their queries."""
        queries, owner = self.queries_of(videos)
        return Split(self.name, [self.video_ids[i] for i in videos.tolist()],
                     [self.cap_ids[i] for i in queries.tolist()], [self.captions[i] for i in queries.tolist()],
                     owner, self.frames.select(videos), self.tokens.select(queries))

    def queries_of(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of all queries of `videos` and, for each, its position in `videos`."""
        start = self.query_offsets[videos]
        counts = self.query_offsets[videos + 1] - start
        owner = torch.repeat_interleave(torch.arange(len(videos)), counts)
        first = torch.cumsum(counts, 0) - counts                        # position of each video's first query
        queries = start[owner] + torch.arange(int(counts.sum())) - first[owner]
        return queries, owner


@dataclass
class PRVRData:
    """A dataset ready to train on: splits by name and a record of where it came from."""

    splits: dict[str, Split]
    source: dict

    @property
    def video_dim(self) -> int:
        return self.splits["train"].frames.dim

    @property
    def text_dim(self) -> int:
        return self.splits["train"].tokens.dim

    def with_train_subset(self, n_videos: int | None, seed: int = 0) -> "PRVRData":
        """The data with its train split cut to a seeded random `n_videos` of its videos (None keeps all).

        The source records the cut (`train_subset`), so a checkpoint and a resumed run know about it.
        """
        train = self.splits["train"]
        if n_videos is None or n_videos >= train.n_videos:
            return self
        if n_videos < 2:
            raise DataError(f"a training subset of {n_videos} video is too small; use at least 2")
        picked = torch.randperm(train.n_videos, generator=torch.Generator().manual_seed(seed))[:n_videos]
        splits = {**self.splits, "train": train.subset(picked.sort().values)}
        return PRVRData(splits, {**self.source, "train_subset": n_videos, "train_subset_seed": seed})

    def summary(self) -> str:
        parts = [f"{n}: {counted(s.n_videos, 'video')} / {counted(s.n_queries, 'query', 'queries')}"
                 for n, s in self.splits.items()]
        return f"{self.source['layout']} {self.source.get('collection', '')} ({'; '.join(parts)})".strip()


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """'1 video', '2 videos'."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


# ---------------------------------------------------------------------------- captions

def read_caption_file(path: Path) -> list[tuple[str, str, str]]:
    """(cap_id, video_id, text) per line of a `<video_id>#enc#<n> <caption>` file."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read caption file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        cap_id, _, text = line.partition(" ")
        if not text.strip():
            raise DataError(f"{path}:{n}: expected '<video_id>#enc#<n> <caption>', got {line[:60]!r}")
        out.append((cap_id, cap_id.split("#")[0], text.strip()))
    if not out:
        raise DataError(f"caption file {path} is empty; every split needs at least one caption")
    seen = set()
    for cap_id, _, _ in out:
        if cap_id in seen:
            raise DataError(f"caption file {path} repeats caption id {cap_id!r}; caption ids must be unique")
        seen.add(cap_id)
    return out


def caption_files(text_dir: Path, coll: str) -> dict[str, Path]:
    """The caption file of each split that exists; train is required."""
    files = {s: text_dir / f"{coll}{s}.caption.txt" for s in SPLITS}
    if not files["train"].is_file():
        raise DataError(f"training captions {files['train']} not found; expected <video_id>#enc#<n> <caption> lines")
    return {s: p for s, p in files.items() if p.is_file()}


# ---------------------------------------------------------------------------- assembly

def build_split(name: str, captions: list[tuple[str, str, str]], video_feats: dict[str, np.ndarray],
                token_feats: dict[str, np.ndarray]) -> Split:
    """Group captions by video (first-seen order) and pack their features."""
    video_ids = list(dict.fromkeys(v for _, v, _ in captions))
    position = {v: i for i, v in enumerate(video_ids)}
    order = sorted(range(len(captions)), key=lambda i: position[captions[i][1]])  # stable: keeps caption order
    captions = [captions[i] for i in order]
    return Split(
        name=name,
        video_ids=video_ids,
        cap_ids=[c for c, _, _ in captions],
        captions=[t for _, _, t in captions],
        query_video=torch.tensor([position[v] for _, v, _ in captions], dtype=torch.long),
        frames=Packed.from_arrays([video_feats[v] for v in video_ids]),
        tokens=Packed.from_arrays([token_feats[c] for c, _, _ in captions]),
    )


def check_features(feats: dict[str, np.ndarray], what: str, origin: str) -> int:
    """All arrays 2-D, non-empty, finite and of one width; returns that width."""
    dim = None
    for key, a in feats.items():
        if a.ndim != 2 or len(a) == 0:
            raise DataError(f"{what} {key!r} in {origin} has shape {tuple(a.shape)}; "
                            "expected a non-empty [rows, dim] array")
        if dim is None:
            dim = a.shape[1]
        elif a.shape[1] != dim:
            raise DataError(f"{what} {key!r} in {origin} has dim {a.shape[1]}, others have {dim}; "
                            "all features of a dataset must come from one extractor")
        if not np.isfinite(a).all():
            raise DataError(f"{what} {key!r} in {origin} contains NaN or inf; re-extract the features")
    return dim


def carve_val(captions: list[tuple[str, str, str]], seed: int, fraction: float = 0.1):
    """Split captions into (train, val) by video: a seeded `fraction` of videos (at least 1) go to val."""
    videos = sorted({v for _, v, _ in captions})
    if len(videos) < 2:
        raise DataError(f"only {len(videos)} video has captions; need at least 2 to hold one out for validation")
    random.Random(seed).shuffle(videos)
    held = set(videos[:max(1, round(fraction * len(videos)))])
    return [c for c in captions if c[1] not in held], [c for c in captions if c[1] in held]


def assemble(split_captions: dict[str, list], video_feats: dict[str, np.ndarray], token_feats: dict[str, np.ndarray],
             source: dict, video_origin: str, text_origin: str) -> PRVRData:
    """Validate features against captions and build the splits."""
    dv = check_features(video_feats, "video", video_origin)
    dt = check_features(token_feats, "caption", text_origin)
    splits = {name: build_split(name, caps, video_feats, token_feats)
              for name, caps in split_captions.items()}
    return PRVRData(splits, {**source, "video_dim": dv, "text_dim": dt})


def require(wanted: dict[str, str], available, what: str, origin: str):
    """DataError naming the first id of `wanted` (id -> caption file naming it) missing from `available`."""
    for key, caption_file in wanted.items():
        if key not in available:
            raise DataError(f"{what} {key!r} (from {caption_file}) has no features in {origin}")


def split_with_val(files: dict[str, Path], seed: int) -> dict[str, list]:
    """Captions per split; when there is no val file, 10% of the training videos become val."""
    caps = {s: read_caption_file(p) for s, p in files.items()}
    if "val" not in caps:
        caps["train"], caps["val"] = carve_val(caps["train"], seed)
    return {s: caps[s] for s in SPLITS if s in caps}


def origins(split_captions: dict[str, list], files: dict[str, Path]) -> tuple[dict, dict]:
    """Map every cap id and video id to the caption file that mentions it (for error messages)."""
    by_cap, by_video = {}, {}
    for s, caps in split_captions.items():
        name = str(files.get(s, files["train"]))
        for c, v, _ in caps:
            by_cap[c] = name
            by_video.setdefault(v, name)
    return by_cap, by_video


# ---------------------------------------------------------------------------- h5 layout

def read_h5(path: Path, keys, what: str, aliases=lambda key: ()) -> dict[str, np.ndarray]:
    """float32 arrays of the datasets `keys` of an HDF5 file, each found under its key or the first of its
    `aliases(key)` the file holds (keys found under neither are left out)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            found = {k: next((name for name in (k, *aliases(k)) if name in f), None) for k in keys}
            return {k: f[name][...].astype(np.float32) for k, name in found.items() if name is not None}
    except OSError as e:
        raise DataError(f"cannot read {what} file {path}: {e}") from e


def video_id_aliases(video_id: str) -> tuple[str, ...]:
    """Other keys a video's features may be stored under: ActivityNet caption ids carry YouTube's `v_` prefix,
    and some feature releases (MSC_PRVR's CLIP features) drop it, or the other way round."""
    return (video_id[2:],) if video_id.startswith("v_") else (f"v_{video_id}",)


def load_h5(root: Path, coll: str, feat: str, text_feature: str | None = None, seed: int = 0) -> PRVRData:
    """The cg_prvr layout: one HDF5 of video features, one of token features."""
    base = Path(root) / coll
    video_file = base / "FeatureData" / f"{coll}_{feat}.h5"
    text_file = text_path(base, text_feature or f"{coll}_{feat}.h5")
    for path, what in ((video_file, "video feature"), (text_file, "text feature")):
        if not path.is_file():
            raise DataError(f"{what} file {path} not found; check --data/--collection/--feature")
    files = caption_files(base / "TextData", coll)
    split_caps = split_with_val(files, seed)
    cap_origin, video_origin = origins(split_caps, files)
    videos = read_h5(video_file, video_origin, "video feature", aliases=video_id_aliases)
    require(video_origin, videos, "video", str(video_file))
    tokens = read_h5(text_file, cap_origin, "text feature")
    require(cap_origin, tokens, "caption", str(text_file))
    source = {"layout": "h5", "root": str(Path(root).resolve()), "collection": coll, "feature": feat,
              "text_feature": text_file.name}
    return assemble(split_caps, videos, tokens, source, str(video_file), str(text_file))


def text_path(base: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else base / "TextData" / path


# ---------------------------------------------------------------------------- MS-SL layout

def read_bigfile(feat_dir: Path, video_frames: dict[str, list], wanted) -> dict[str, np.ndarray]:
    """Frame rows of each wanted video from an MS-SL `feature.bin` / `id.txt` / `shape.txt` folder."""
    shape_file, id_file, bin_file = feat_dir / "shape.txt", feat_dir / "id.txt", feat_dir / "feature.bin"
    try:
        n_rows, dim = (int(x) for x in shape_file.read_text().split()[:2])
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {shape_file} (expected '<n_rows> <dim>'): {e}") from e
    try:
        names = id_file.read_bytes().decode("latin-1").split()
    except OSError as e:
        raise DataError(f"cannot read frame ids {id_file}: {e}") from e
    if len(names) != n_rows:
        raise DataError(f"{id_file} lists {len(names)} frame ids but {shape_file} says {n_rows} rows")
    expected = n_rows * dim * 4
    if not bin_file.is_file() or bin_file.stat().st_size != expected:
        size = bin_file.stat().st_size if bin_file.is_file() else "missing"
        raise DataError(f"{bin_file} has size {size}, expected {expected} bytes ({n_rows} x {dim} float32)")
    table = np.memmap(bin_file, dtype=np.float32, mode="r", shape=(n_rows, dim))
    row_of = {name: i for i, name in enumerate(names)}
    out = {}
    for video in wanted:
        frames = video_frames.get(video)
        if frames is None:
            continue
        missing = [f for f in frames if f not in row_of]
        if missing:
            raise DataError(f"frame {missing[0]!r} of video {video!r} (video2frames.txt) is not in {id_file}")
        out[video] = np.asarray(table[[row_of[f] for f in frames]], dtype=np.float32)
    return out


def load_mssl(root: Path, coll: str, feat: str, text_feature: str | None = None, seed: int = 0) -> PRVRData:
    """The MS-SL layout: BigFile frame features plus a per-token text HDF5."""
    base = Path(root) / coll
    feat_dir = base / "FeatureData" / feat
    text_file = text_path(base, text_feature or f"roberta_{coll}_query_feat.hdf5")
    v2f_file = feat_dir / "video2frames.txt"
    for path, what in ((feat_dir / "feature.bin", "video feature"), (v2f_file, "video2frames"),
                       (text_file, "text feature")):
        if not path.is_file():
            raise DataError(f"{what} file {path} not found; check --data/--collection/--feature/--text-feature")
    try:
        video_frames = ast.literal_eval(v2f_file.read_text())
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{v2f_file} is not a Python dict literal (video id -> frame ids): {e}") from e
    if not isinstance(video_frames, dict):
        raise DataError(f"{v2f_file} must hold a dict literal mapping video id -> list of frame ids")
    files = caption_files(base / "TextData", coll)
    split_caps = split_with_val(files, seed)
    cap_origin, video_origin = origins(split_caps, files)
    videos = read_bigfile(feat_dir, video_frames, video_origin)
    require(video_origin, videos, "video", str(v2f_file))
    tokens = read_h5(text_file, cap_origin, "text feature")
    require(cap_origin, tokens, "caption", str(text_file))
    source = {"layout": "mssl", "root": str(Path(root).resolve()), "collection": coll, "feature": feat,
              "text_feature": text_file.name}
    return assemble(split_caps, videos, tokens, source, str(feat_dir), str(text_file))


# ---------------------------------------------------------------------------- own videos

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


# ---------------------------------------------------------------------------- entry point

def detect_layout(root: Path, coll: str, feat: str) -> str:
    """'h5' or 'mssl', from which feature file exists."""
    base = Path(root) / coll / "FeatureData"
    h5_file, bin_file = base / f"{coll}_{feat}.h5", base / feat / "feature.bin"
    if h5_file.is_file():
        return "h5"
    if bin_file.is_file():
        return "mssl"
    if not (Path(root) / coll).is_dir():
        raise DataError(f"collection folder {Path(root) / coll} not found; check --data and --collection")
    names = feature_names(Path(root), coll)
    raise DataError(f"no features named {feat!r} in {Path(root) / coll}: neither {h5_file} nor {bin_file} exists; "
                    + (f"features there: {', '.join(names)}" if names else "that collection has no features"))


def feature_names(root: Path, coll: str) -> list[str]:
    """The --feature names a collection offers, in either layout."""
    base = Path(root) / coll / "FeatureData"
    h5 = [p.stem[len(coll) + 1:] for p in base.glob(f"{coll}_*.h5")]
    bigfile = [p.parent.name for p in base.glob("*/feature.bin")]
    return sorted(set(h5 + bigfile))


def load_features(root: Path, coll: str, feat: str, text_feature: str | None = None, seed: int = 0) -> PRVRData:
    """Load a pre-extracted dataset, detecting its layout (`root` may also be the collection folder itself)."""
    root = Path(root)
    if not (root / coll).is_dir() and root.name == coll and (root / "FeatureData").is_dir():
        root = root.parent
    loader = load_h5 if detect_layout(root, coll, feat) == "h5" else load_mssl
    return loader(root, coll, feat, text_feature=text_feature, seed=seed)
