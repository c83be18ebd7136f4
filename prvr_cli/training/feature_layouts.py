"""Pre-extracted PRVR datasets in their two published layouts, read into `datasets.PRVRData`.

* `h5` (the cg_prvr benchmark, MSC_PRVR's CLIP features): `{root}/{coll}/FeatureData/{coll}_{feat}.h5`
  holds one `[T, Dv]` dataset per video id, `{root}/{coll}/TextData/{coll}_{feat}.h5` one `[L, Dt]`
  dataset per caption id.
* `mssl` (MS-SL / GMMFormer releases): `{root}/{coll}/FeatureData/{feat}/` holds `feature.bin` (raw
  float32 rows), `id.txt` (one frame id per row), `shape.txt` (`n_rows dim`) and `video2frames.txt`
  (a dict literal: video id -> frame ids); token features live in
  `{root}/{coll}/TextData/roberta_{coll}_query_feat.hdf5`.

Both share the caption files `{root}/{coll}/TextData/{coll}{split}.caption.txt` with lines
`<video_id>#enc#<n> <caption>`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from ..errors import DataError
from .datasets import SPLITS, PRVRData, assemble, carve_val

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
    return _with_captions(root, coll, feat, "h5", seed, text_file, video_file,
                          lambda wanted: read_h5(video_file, wanted, "video feature", aliases=video_id_aliases))


def _with_captions(root: Path, coll: str, feat: str, layout: str, seed: int, text_file: Path, video_where: Path,
                   read_videos) -> PRVRData:
    """Every split's captions with their token features (`text_file`) and their videos' features
    (`read_videos(ids)`, read from `video_where`), checked and assembled."""
    files = caption_files(Path(root) / coll / "TextData", coll)
    split_caps = split_with_val(files, seed)
    cap_origin, video_origin = origins(split_caps, files)
    videos = read_videos(video_origin)
    require(video_origin, videos, "video", str(video_where))
    tokens = read_h5(text_file, cap_origin, "text feature")
    require(cap_origin, tokens, "caption", str(text_file))
    source = {"layout": layout, "root": str(Path(root).resolve()), "collection": coll, "feature": feat,
              "text_feature": text_file.name}
    return assemble(split_caps, videos, tokens, source, str(video_where), str(text_file))


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
    return _with_captions(root, coll, feat, "mssl", seed, text_file, v2f_file,
                          lambda wanted: read_bigfile(feat_dir, video_frames, wanted))


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
