"""What the tests share: synthesized videos, a tiny random CLIP, synthetic PRVR datasets, an in-process CLI.

Fixtures live in conftest.py; test modules import these helpers, never each other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CLIP = str(FIXTURES / "prvr-tiny-clip.json")
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def make_video(path: Path, colors: list[tuple[int, int, int]], seconds_per_color: float = 1.0, fps: int = 10,
               size: tuple[int, int] = (64, 48), codec: str = "mpeg4") -> Path:
    """Write a video showing each color in turn (with a moving bar, so frames differ)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        n = int(seconds_per_color * fps)
        for c, color in enumerate(colors):
            for i in range(n):
                img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                img[:] = color
                x = (i * 5) % size[0]
                img[:, x:x + 4] = 255 - np.asarray(color, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


PALETTE = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 230, 40), (200, 40, 200), (40, 210, 210)]



class CLI:
    """Runs `prvr` in-process (fast: torch and open_clip are imported once) and captures its output."""

    def __init__(self, capsys, index: Path):
        self.capsys, self.index = capsys, index

    def __call__(self, *args: str, index: bool = True, tiny: bool = False):
        from prvr_cli.cli import main

        argv = [str(a) for a in args]
        if index:
            argv += ["--index", str(self.index)]
        if tiny:
            argv += ["--clip-model", TINY_CLIP, "--clip-pretrained", "none"]
        self.capsys.readouterr()
        code = main(argv)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ingest(self, *paths, extra=(), tiny=True):
        code, out, err = self("ingest", *paths, "--json", "--quiet", *extra, tiny=tiny)
        summary = json.loads(out) if out.strip() else None
        return code, summary, err



def as_another_user(command: list[str]) -> list[str]:
    """`command` run as a user without root's rights to read and write everything (nobody, when we are root)."""
    return (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []) + command


# ------------------------------------------------------------------ synthetic PRVR datasets

VIDEO_DIM, TEXT_DIM = 12, 8


def synthetic(n_videos=(24, 6, 6), moments=3, seed=0, noise=0.3):
    """A learnable toy PRVR set: each video plays `moments` concepts; each caption names one of them.

    Returns {split: [(video_id, frames [T, Dv], [(cap_id, text, tokens [L, Dt])...])...]}.
    """
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(40, 6))
    to_video, to_text = rng.normal(size=(6, VIDEO_DIM)), rng.normal(size=(6, TEXT_DIM))
    out, n = {}, 0
    for split, count in zip(("train", "val", "test"), n_videos):
        out[split] = []
        for _ in range(count):
            vid = f"v{n:03d}"
            n += 1
            picks = rng.choice(len(concepts), moments, replace=False)
            lengths = rng.integers(2, 6, size=moments)
            latent = np.concatenate([np.repeat(concepts[p][None], k, 0) for p, k in zip(picks, lengths)])
            frames = np.tanh(latent @ to_video) + noise * rng.normal(size=(len(latent), VIDEO_DIM))
            caps = []
            for j, p in enumerate(picks):
                L = int(rng.integers(3, 7))
                tokens = concepts[p] @ to_text + noise * rng.normal(size=(L, TEXT_DIM))
                caps.append((f"{vid}#enc#{j}", f"caption {j} of {vid}", tokens))
            out[split].append((vid, frames, caps))
    return out


def write_captions(text_dir: Path, coll: str, data: dict, splits=("train", "val", "test")):
    text_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        lines = [f"{cap} {text}" for _, _, caps in data[split] for cap, text, _ in caps]
        (text_dir / f"{coll}{split}.caption.txt").write_text("\n".join(lines) + "\n")


def write_h5_dataset(root: Path, coll="toy", feat="cg", data=None, splits=("train", "val", "test")) -> dict:
    """The cg_prvr layout, features in float16 as the benchmark writes them."""
    data = data or synthetic()
    base = root / coll
    (base / "FeatureData").mkdir(parents=True, exist_ok=True)
    write_captions(base / "TextData", coll, data, splits)
    with h5py.File(base / "FeatureData" / f"{coll}_{feat}.h5", "w") as f:
        for split in data.values():
            for vid, frames, _ in split:
                f[vid] = frames.astype(np.float16)
    write_tokens(base / "TextData" / f"{coll}_{feat}.h5", data, np.float16)
    return data


def write_mssl_dataset(root: Path, coll="toy", feat="i3d", data=None) -> dict:
    """The MS-SL layout: BigFile frame rows, video2frames dict literal, roberta token HDF5."""
    data = data or synthetic()
    base = root / coll
    feat_dir = base / "FeatureData" / feat
    feat_dir.mkdir(parents=True)
    write_captions(base / "TextData", coll, data)
    rows, names, v2f = [], [], {}
    for split in data.values():
        for vid, frames, _ in split:
            ids = [f"{vid}_{i}" for i in range(len(frames))]
            v2f[vid] = ids
            names += ids
            rows.append(frames.astype(np.float32))
    rows = np.concatenate(rows)
    # shuffle the row order: frames are looked up by id, not position
    perm = np.random.default_rng(1).permutation(len(rows))
    rows, names = rows[perm], [names[i] for i in perm]
    rows.tofile(feat_dir / "feature.bin")
    (feat_dir / "id.txt").write_text(" ".join(names))
    (feat_dir / "shape.txt").write_text(f"{len(rows)} {rows.shape[1]}")
    (feat_dir / "video2frames.txt").write_text(repr(v2f))
    write_tokens(base / "TextData" / f"roberta_{coll}_query_feat.hdf5", data, np.float32)
    return data


def write_tokens(path: Path, data: dict, dtype) -> None:
    """Every caption's token features, keyed by caption id, in one HDF5 file."""
    with h5py.File(path, "w") as f:
        for split in data.values():
            for _, _, caps in split:
                for cap, _, tokens in caps:
                    f[cap] = tokens.astype(dtype)
