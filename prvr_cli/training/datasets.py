"""Training data for PRVR in one in-memory form, whatever it was read from.

The features of a split are *packed*: all rows of all videos concatenated with offsets, so a
batch is cut out with one gather and no per-sample Python work. The readers are
`feature_layouts` (pre-extracted h5 and MS-SL datasets) and `own_videos` (an index plus captions);
everything is validated on load, and a problem the user can fix raises `DataError`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

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
