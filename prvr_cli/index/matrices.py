"""The search matrices: every video's prototypes per branch as one array, cached per table version.

A search scores these without parsing the table. The cache is rebuilt automatically after any
write. It holds bfloat16 (as uint16 bit patterns: numpy has no bfloat16), half of float32: a
scan streams it through a fixed buffer and widens each block to float32 with a 16-bit shift,
which costs a fraction of widening float16 (see docs/benchmarks.md), and the process never holds
the whole cache. The first folder that can be written holds it; with none (a read-only index and
no cache folder), the matrices are built in memory (float32) for this search only.

A cache folder holds, for one version of the videos table:

    proto_clip.npy, proto_frame.npy   prototypes [N, Lp, D], bfloat16 bits (uint16)
    copy_of.npy                       per video, the first video with the same content
    rows.arrow                        per video (same order): path, duration, fps, timestamps and the prototypes'
                                      frame attention, for highlights (an Arrow IPC file, memory-mapped)
    ann_*.npy, ann.json               from ann.ANN_MIN_VIDEOS videos up: approximate candidates (see ann.py)
    videos.json                       the paths; written last, it marks the folder complete

and `current.json` beside the folders names the version last cached, so a search that does not open
LanceDB (`prvr_cli.query`) finds it; it checks that version against the table's newest manifest.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import ann
from ..errors import CorruptError, DiskError
from .remote import RemoteIndex, manifest_version

CACHE_KIND = "bf16-5"  # the layout: bfloat16 prototypes, paths in videos.json, copy_of.npy, rows.arrow
POINTER = "current.json"
ROW_COLUMNS = ["path", "duration", "fps", "timestamps", "attn_clip", "attn_frame"]


class SearchMatrices(NamedTuple):
    """What a search scores: per video its path, the first video with the same content (itself if none came
    before; identical copies share it), and its prototypes per branch [N, Lp, D]."""

    paths: list[str]
    copy_of: np.ndarray
    clip: "np.ndarray | PrototypeFile"
    frame: "np.ndarray | PrototypeFile"
    folder: Path | None = None        # the cache folder (None: matrices in memory)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact), into `out` (uint32 or float32, same size) if given."""
    wide = np.left_shift(bits, 16, dtype=np.uint32, out=None if out is None else out.view(np.uint32))
    return wide.view(np.float32)


class PrototypeFile:
    """Prototypes [N, Lp, D] of a cache file in bfloat16: streamed in blocks for a scan, gathered by video.

    The file stays open from here on: a writer that publishes a newer cache removes this one, and a search
    already holding it reads on from the open file (POSIX keeps an unlinked file's data while it is open).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "rb", buffering=0)
        try:
            version = np.lib.format.read_magic(self.file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(self.file)
            self.offset = self.file.tell()
            if dtype != np.uint16 or len(shape) != 3:
                raise ValueError(f"{path}: not a bfloat16 prototype matrix")
        except BaseException:
            self.file.close()
            raise
        self.shape = tuple(shape)

    def mapped(self) -> np.ndarray:
        """The whole matrix as a read-only memory map of the open file."""
        return np.memmap(self.file, dtype=np.uint16, mode="r", offset=self.offset, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, videos) -> np.ndarray:
        """float32 prototypes of the given videos (index or array of indices)."""
        return from_bfloat16(np.asarray(self.mapped()[videos]))

    def prefetch(self, videos: np.ndarray) -> None:
        """Ask the kernel to read the given videos' rows now, all at once. A gather through the memory map faults
        their pages in one by one; on a file larger than the file cache that cost 2 s for 256 videos here, against
        25 ms with this hint first (docs/scaling.md)."""
        if not hasattr(os, "posix_fadvise") or not len(videos):
            return
        row = int(np.prod(self.shape[1:])) * 2
        for video in np.asarray(videos).ravel():
            os.posix_fadvise(self.file.fileno(), self.offset + int(video) * row, row, os.POSIX_FADV_WILLNEED)

    def blocks(self, rows: int):
        """(first video, float32 block [n, Lp, D]) over the whole matrix; the block's buffer is reused."""
        n, lp, d = self.shape
        per_block = max(1, rows // lp)
        raw = np.empty(per_block * lp * d, dtype=np.uint16)
        wide = np.empty(per_block * lp * d, dtype=np.float32)
        position = self.offset     # positioned reads: threads of a server may scan the same file at once
        for v0 in range(0, n, per_block):
            count = min(per_block, n - v0) * lp * d
            view = memoryview(raw[:count]).cast("B")
            got = 0
            while got < len(view):
                read = os.preadv(self.file.fileno(), [view[got:]], position + got)
                if not read:
                    raise ValueError(f"{self.path} is truncated")
                got += read
            position += got
            yield v0, from_bfloat16(raw[:count], wide[:count]).reshape(-1, lp, d)


class ResidentPrototypes:
    """Prototypes [N, Lp, D] held in memory as torch bfloat16 and scored with torch's CPU kernels (for a server:
    half the memory of float32, and the product runs at the memory bandwidth without a widening pass).

    torch rounds the query and the products' output to bfloat16 here, so these scores are within `score_error`
    of the exact ones (unit vectors: at most 2^-9 from the query and 2^-9 from the output, plus 5% margin);
    `search.rank` rescores its candidates exactly, so a ranking equals the streamed path's.
    """

    score_error = 1.05 * 2.0 ** -8

    def __init__(self, file: PrototypeFile):
        import torch

        bits = np.array(file.mapped())
        self.shape = file.shape
        self.bits = bits
        self.values = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(-1, file.shape[2])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, videos) -> np.ndarray:
        return from_bfloat16(self.bits[videos])

    def max_scores(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(max score [Q, N], argmax prototype [Q, N]) for float32 queries [Q, D]."""
        import torch

        n, lp, _ = self.shape
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(torch.bfloat16)
        with torch.inference_mode():
            scores = (q @ self.values.T).float().view(len(q), n, lp)
            best, arg = scores.max(-1)
        return best.numpy(), arg.to(torch.int32).numpy()


def load_matrices(table, proto_dim: int, folders: list[Path], retrain: bool = False) -> SearchMatrices:
    """The matrices of `table` at its version, from the first of `folders` that holds or can hold them. A cache
    built here trains its approximate candidates afresh with `retrain`, else reuses an older version's centroids."""
    for folder in folders:
        cache = folder / f"videos-v{table.version}-{CACHE_KIND}"
        if (cache / "videos.json").exists():
            break
        try:
            _build_cache(table, proto_dim, cache, retrain)
            break
        except DiskError:
            return _read_table(table, proto_dim)  # disk full: search from memory, without a cache
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
    else:
        return _read_table(table, proto_dim)  # nowhere to write: search from memory
    try:
        videos = json.loads((cache / "videos.json").read_text())
        _point_at(folder, table.version)
        return SearchMatrices(videos["paths"], np.load(cache / "copy_of.npy"), PrototypeFile(cache / "proto_clip.npy"),
                              PrototypeFile(cache / "proto_frame.npy"), cache)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        shutil.rmtree(cache, ignore_errors=True)  # damaged cache: rebuild from the table
        # a damaged cache that cannot be removed (a read-only index): use the other folders
        return load_matrices(table, proto_dim, [f for f in folders if f != folder] if cache.exists() else folders,
                             retrain)


SCAN_BATCH = 2048    # videos read from the table at a time when building matrices (bounded memory)


def _table_batches(table, dim: int):
    """(paths, content hashes, clip and frame prototypes as bfloat16 bits [b, Lp, D], highlight rows) for each
    batch of the table's videos in table order, reading a few thousand videos at a time."""
    import pyarrow as pa

    columns = sorted({"content_hash", "proto_clip", "proto_frame", *ROW_COLUMNS})
    reader = table.search().select(columns).limit(None).to_batches(SCAN_BATCH)
    for batch in reader:
        data = pa.Table.from_batches([batch])
        protos = []
        for col in ("proto_clip", "proto_frame"):
            arr = data[col].combine_chunks()
            counts = np.diff(arr.offsets.to_numpy())
            if len(set(counts.tolist())) > 1:
                raise CorruptError("the index's videos have different prototype counts; run `prvr reindex`")
            values = arr.flatten().flatten().to_numpy(zero_copy_only=False)
            protos.append(to_bfloat16(values).reshape(len(arr), int(counts[0]) if len(counts) else 0, dim))
        yield data["path"].to_pylist(), data["content_hash"].to_pylist(), protos[0], protos[1], \
            data.select(ROW_COLUMNS)


def _copy_of(hashes: list[str]) -> np.ndarray:
    first: dict[str, int] = {}
    return np.array([first.setdefault(h, v) for v, h in enumerate(hashes)], np.int64)


def _read_table(table, dim: int) -> SearchMatrices:
    """The matrices in memory (float32 of the bfloat16 values a cache holds, so every search scores alike)."""
    paths, hashes, clip, frame = [], [], [], []
    for p, h, c, f, _ in _table_batches(table, dim):
        paths += p
        hashes += h
        clip.append(c)
        frame.append(f)
    return SearchMatrices(paths, _copy_of(hashes), from_bfloat16(np.concatenate(clip)),
                          from_bfloat16(np.concatenate(frame)))


def _build_cache(table, dim: int, cache: Path, retrain: bool = False) -> None:
    """Write the matrices into `cache` batch by batch, atomically (a temporary folder renamed), then drop older
    versions'. Memory stays bounded by one batch of videos whatever the library's size."""
    import pyarrow as pa

    n = table.count_rows()
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        paths, hashes, matrices, writer, sink, done = [], [], None, None, None, 0
        try:
            for p, h, clip, frame, rows in _table_batches(table, dim):
                if matrices is None:
                    matrices = [np.lib.format.open_memmap(tmp / f"proto_{b}.npy", mode="w+", dtype=np.uint16,
                                                          shape=(n, *m.shape[1:])) for b, m in (("clip", clip),
                                                                                                ("frame", frame))]
                    sink = pa.OSFile(str(tmp / "rows.arrow"), "wb")
                    writer = pa.ipc.new_file(sink, rows.schema)
                if clip.shape[1:] != matrices[0].shape[1:] or frame.shape[1:] != matrices[1].shape[1:]:
                    raise CorruptError("the index's videos have different prototype counts; run `prvr reindex`")
                matrices[0][done:done + len(p)], matrices[1][done:done + len(p)] = clip, frame
                writer.write_table(rows)
                paths += p
                hashes += h
                done += len(p)
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        if matrices is None or done != n:
            raise CorruptError(f"index table read {done} of {n} videos; run the search again")
        for m in matrices:
            m.flush()
        del matrices
        if n >= ann.ANN_MIN_VIDEOS:   # a large library: approximate candidates, kept current with each version
            ann.build(tmp, PrototypeFile(tmp / "proto_clip.npy"), PrototypeFile(tmp / "proto_frame.npy"),
                      None if retrain else ann.previous_layout(cache))
        np.save(tmp / "copy_of.npy", _copy_of(hashes))
        (tmp / "videos.json").write_text(json.dumps({"paths": paths}))
        try:
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "videos.json").exists():
                raise
            shutil.rmtree(tmp)  # another search built it at the same moment
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskError(f"no space left on the device holding {cache.parent} for the search cache; "
                            "free space and run again") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in cache.parent.glob("videos-v*"):  # not a newer version, which another process may have published since
        version, kind = cache_version(old)
        if version is not None and (version < table.version or kind != CACHE_KIND):
            shutil.rmtree(old, ignore_errors=True)


def cache_version(folder: Path) -> tuple[int | None, str]:
    """(table version, layout kind) of a cache folder's name; (None, "") for a temporary or foreign folder."""
    match = re.fullmatch(r"videos-v(\d+)-([\w-]+)", folder.name)
    return (int(match.group(1)), match.group(2)) if match else (None, "")


def _point_at(folder: Path, version: int) -> None:
    """Record in `folder` that the cache of `version` is complete (atomically; a failure only costs speed)."""
    tmp = folder / f"{POINTER}.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"version": int(version), "kind": CACHE_KIND}))
        os.replace(tmp, folder / POINTER)
    except OSError:
        tmp.unlink(missing_ok=True)


def cache_folders(root: Path, user_cache: Path | None) -> list[Path]:
    """Where an index's search matrices may be: its own cache folder, else one per index under the user's cache."""
    folders = [root / "cache"]
    if user_cache is not None:  # where a read-only index keeps them: a folder per index, by its path
        folders.append(Path(user_cache) / hashlib.sha1(str(root).encode()).hexdigest()[:16])
    return folders


def latest_version(table_dir: Path) -> int | None:
    """The newest committed version of a Lance table, from its manifest file names (None if there is none)."""
    try:
        names = os.listdir(table_dir / "_versions")
    except OSError:
        return None
    return max((v for v in map(manifest_version, names) if v is not None), default=None)


def published(root: Path, user_cache: Path | None) -> Path | None:
    """The complete cache folder of the videos table's newest version, if a search or a writer has made one
    (for the mirror of an index on object storage, the newest version is asked of the store)."""
    remote = RemoteIndex.marked(root)
    newest = remote.latest_version() if remote else latest_version(root / "db" / "videos.lance")
    if newest is None:
        return None
    for folder in cache_folders(root, user_cache):
        try:
            pointer = json.loads((folder / POINTER).read_text())
        except (OSError, ValueError):
            continue
        cache = folder / f"videos-v{newest}-{CACHE_KIND}"
        if pointer.get("version") == newest and pointer.get("kind") == CACHE_KIND and (cache / "videos.json").exists():
            return cache
    return None
