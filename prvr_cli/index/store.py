"""Stage 5: the index, an embedded LanceDB database in one folder.

Layout of an index folder:

    index.json        format version, the encoder and prototype builder that made it
    db/videos.lance   one row per video: file identity, timing, prototypes per branch
                      (multivector columns), per-prototype frame attention
    db/frames.lance   one row per video: its CLIP frame features (fp16), for `prvr reindex`
    model.pt          a copy of the trained checkpoint that built the prototypes (none for zero-shot), so the
                      folder can be moved or shared alone
    cache/            search matrices derived from a table version (safe to delete); a search that cannot write
                      here (a read-only index) keeps them under the user's cache folder, or in memory
    .lock             held by the process that writes

Every write makes a new table version. Writers prune versions that were superseded more than VERSION_GRACE
seconds ago (a search still reading one would have been running that long); `prvr compact` prunes them all.

A video's frames row is written before its videos row, and stale frames rows are
removed after, so a crash at any point leaves only complete videos plus, at
worst, orphan frames rows that the next writer removes (`repair`).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

os.environ.setdefault("LANCE_LOG", "error")

import numpy as np  # noqa: E402

from ..errors import CorruptError, DiskError, IndexMissingError, LockedError, RemoteError  # noqa: E402
from .matrices import SearchMatrices, cache_folders, load_matrices  # noqa: E402
from .meta import FORMAT_VERSION, META_FILE, read_meta, write_meta  # noqa: E402
from .remote import RemoteIndex  # noqa: E402
from .rows import VideoRecord, schemas, sql_str, to_table  # noqa: E402

MODEL_FILE = "model.pt"
VERSION_GRACE = 60.0  # seconds a superseded table version is kept for searches that may still read it


def _disk_guard(fn):
    """Turn out-of-space and write errors into a DiskError with a one-line message."""

    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskError(f"no space left on the device holding {self.location}; free space and run again "
                                "(videos already indexed are kept)") from e
            raise
        except Exception as e:  # lance reports I/O failures as generic errors carrying the OS message
            text = str(e)
            if "No space left" in text or "Disk quota" in text:
                raise DiskError(f"no space left on the device holding {self.location}; free space and run again "
                                "(videos already indexed are kept)") from e
            raise

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class Index:
    """A prvr index folder. Open with `Index.open(path)`; write only inside `with index.lock():`."""

    def __init__(self, root: Path, meta: dict, cache_dir: Path | None = None, remote: RemoteIndex | None = None):
        import lancedb

        self.root, self.meta, self.cache_dir, self.remote = root, meta, cache_dir, remote
        if remote is None:
            self.db = lancedb.connect(str(root / "db"))
        else:   # root is the local mirror of the small files; the tables live on object storage
            self.db = lancedb.connect(remote.db_uri, storage_options=remote.storage_options())
        self._snapshot = None  # the videos table version a search ranked, so its rows are read from it too

    @property
    def location(self) -> str:
        """Where the index is, in the user's words: its folder, or its s3:// address."""
        return self.remote.uri if self.remote else str(self.root)

    # ----- opening and identity -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, create: bool = False, cache_dir: Path | None = None,
             remote: RemoteIndex | None = None) -> "Index":
        """Open the index at `path` (with `create`, make it if absent). `cache_dir` holds search matrices
        when the index folder is read-only. With `remote`, `path` is its mirror folder, brought up to date here."""
        root = Path(path).expanduser().resolve()
        if remote is not None:
            remote.pull()
            return cls._open_mirror(root, create, cache_dir, remote)
        meta_path = root / META_FILE
        if root.exists() and not root.is_dir():
            raise CorruptError(f"{root} is a file, not a prvr index folder; pass the right --index")
        if not meta_path.exists():
            if root.exists() and any(root.iterdir()) and not create:
                raise CorruptError(f"{root} is not a prvr index (no {META_FILE}); pass the right --index")
            if not create:
                raise IndexMissingError(f"no index at {root}; build one with `prvr ingest PATH` "
                                        "(or point --index / PRVR_INDEX at an existing one)")
            if root.exists() and any(p.name != ".lock" and not p.name.startswith(META_FILE) for p in root.iterdir()):
                raise CorruptError(f"{root} exists and is not an empty folder or a prvr index; choose another --index")
            root.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT_VERSION, "created": time.time()}
            if write_meta(root, meta, exclusive=True):
                return cls(root, meta, cache_dir)
            return cls.open(root, cache_dir=cache_dir)  # another process created it a moment ago
        return cls(root, read_meta(root), cache_dir)

    @classmethod
    def _open_mirror(cls, root: Path, create: bool, cache_dir: Path | None, remote: RemoteIndex) -> "Index":
        if (root / META_FILE).exists():
            return cls(root, read_meta(root), cache_dir, remote)
        if not create:
            raise IndexMissingError(f"no index at {remote.uri}; build one with `prvr ingest PATH --index {remote.uri}`")
        meta = {"format": FORMAT_VERSION, "created": time.time()}
        write_meta(root, meta)
        remote.push()   # the new index is there for every machine from now on
        return cls(root, meta, cache_dir, remote)

    @property
    def encoder_spec(self) -> dict | None:
        return self.meta.get("encoder")

    @property
    def builder_spec(self) -> dict | None:
        return self.meta.get("builder")

    def bind(self, encoder_spec: dict, builder_spec: dict, proto_dim: int) -> None:
        """Record the encoder and prototype builder of a new index (the caller has checked an existing one)."""
        self.meta.update(encoder=encoder_spec, builder=self._keep_model(builder_spec), proto_dim=proto_dim)
        write_meta(self.root, self.meta)

    def keep_model_copy(self, builder_spec: dict) -> None:
        """Give an index made before indexes kept their model a copy of it (from the builder just loaded)."""
        if builder_spec.get("kind") == "trained" and not (self.root / MODEL_FILE).is_file():
            self.rebind_builder(builder_spec, self.meta["proto_dim"])

    def rebind_builder(self, builder_spec: dict, proto_dim: int) -> None:
        self.meta.update(builder=self._keep_model(builder_spec), proto_dim=proto_dim)
        write_meta(self.root, self.meta)

    def _keep_model(self, builder_spec: dict) -> dict:
        """Copy a trained builder's checkpoint into the index (byte for byte: its fingerprint stays)."""
        target = self.root / MODEL_FILE
        if builder_spec.get("kind") != "trained":
            target.unlink(missing_ok=True)
            return builder_spec
        source = Path(builder_spec["checkpoint"])
        if source.resolve() != target.resolve():
            tmp = target.with_name(f"{MODEL_FILE}.tmp{os.getpid()}")
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return {**builder_spec, "stored": MODEL_FILE}

    def recorded_model(self) -> str | None:
        """The checkpoint that built the prototypes: the index's own copy when it has one, else the recorded path."""
        spec = self.builder_spec or {}
        if spec.get("kind") != "trained":
            return None
        stored = self.root / spec.get("stored", MODEL_FILE)
        return str(stored) if stored.is_file() else spec.get("checkpoint")

    # ----- locking ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait=None):
        """Exclusive writer lock (released by the OS if the holder dies, so it is never stale).

        If another process holds it: raise LockedError, or with `wait` (a function
        of (root, holder pid) that tells the user) block until it is free. The
        index description is read again once the lock is held.
        """
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if wait is None:
                    raise LockedError(f"index {self.location} is being written by another prvr process (pid {holder}); "
                                      "wait for it to finish or use another --index (`prvr ingest --wait` waits)") from None
                wait(self.location, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            if self.remote is not None:
                self.remote.take_lease()
            try:
                if self.remote is not None:
                    self.remote.pull()   # the previous writer, on any machine, may have changed the small files
                self.meta = read_meta(self.root)  # the previous holder may have changed it
                yield self
                if self.remote is not None:
                    self.remote.push()
                self.publish()
            finally:
                if self.remote is not None:
                    with contextlib.suppress(RemoteError):   # a lease left behind is reported to the next writer
                        self.remote.drop_lease()
        finally:
            os.close(fd)

    # ----- tables -------------------------------------------------------------------------

    def _table(self, name: str):
        """The LanceDB table `name`, or None if it was never written; CorruptError if it is there but unreadable."""
        try:
            return self.db.open_table(name)
        except Exception as e:
            missing = isinstance(e, (FileNotFoundError, ValueError)) or "not found" in str(e).lower() \
                or "does not exist" in str(e).lower()
            if missing and self.remote is not None and self.remote.latest_version(name) is None:
                return None
            folder = self.root / "db" / f"{name}.lance"
            if missing and not folder.exists() and self.remote is None:
                return None
            if missing and not any((folder / "_versions").glob("*.manifest")) and self.writer_active():
                return None   # a writer is creating it this moment: no version committed yet
            raise self.unreadable(f"its {name} table") from e

    def writer_active(self) -> bool:
        """Whether a process holds the writer lock now (asks the OS; never blocks, never takes the lock)."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def unreadable(self, what: str) -> CorruptError:
        """The error for damaged table files, in our words (PRVR_DEBUG=1 shows the storage engine's own)."""
        return CorruptError(f"index {self.root}: {what} is damaged or unreadable; restore the index folder from a "
                            "backup or re-ingest into a new one")

    def verify(self) -> None:
        """Read a column of every row of each table, so damaged data files are found (CorruptError)."""
        for name in ("videos", "frames"):
            table = self._table(name)
            if table is None:
                continue
            try:
                table.count_rows()
                table.search().select(["path"]).limit(None).to_arrow()
            except Exception as e:
                raise self.unreadable(f"its {name} table") from e

    @property
    def videos(self):
        return self._table("videos")

    @property
    def frames(self):
        return self._table("frames")

    def _ensure_tables(self):
        videos, frames = self.videos, self.frames
        v_schema, f_schema = schemas(int(self.meta["proto_dim"]), int(self.encoder_spec["dim"]))
        if frames is None:
            frames = self.db.create_table("frames", schema=f_schema, exist_ok=True)
        if videos is None:
            videos = self.db.create_table("videos", schema=v_schema, exist_ok=True)
        return videos, frames

    # ----- reading ------------------------------------------------------------------------

    def count(self) -> int:
        table = self.videos
        return 0 if table is None else table.count_rows()

    def file_states(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, content hash) of every indexed video."""
        table = self.videos
        if table is None:
            return {}
        t = table.to_arrow().select(["path", "size", "mtime", "content_hash"]).to_pydict()
        return {p: (s, m, h) for p, s, m, h in zip(t["path"], t["size"], t["mtime"], t["content_hash"])}

    def iter_frame_features(self, batch: int = 64) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(path, timestamps [T], features [T, D] float16) of every indexed video, read in small batches."""
        videos, frames = self.videos, self.frames
        if videos is None or frames is None:
            return
        keys = videos.to_arrow().select(["path", "content_hash"]).to_pydict()
        keys = sorted(zip(keys["path"], keys["content_hash"]))
        dim = int(self.encoder_spec["dim"])
        for lo in range(0, len(keys), batch):
            group = dict(keys[lo:lo + batch])
            where = "path IN (" + ", ".join(sql_str(p) for p in group) + ")"
            t = frames.search().where(where).select(["path", "content_hash", "timestamps", "features"]) \
                .limit(len(group) * 2).to_arrow()
            stamps, feats = t["timestamps"], t["features"]
            for i, (p, h) in enumerate(zip(t["path"].to_pylist(), t["content_hash"].to_pylist())):
                if group.get(p) != h:
                    continue
                ts = stamps[i].values.to_numpy(zero_copy_only=False)
                f = feats[i].values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                yield p, ts, f

    def rows(self, paths: list[str], columns: list[str]) -> dict[str, dict]:
        """Selected columns of the given videos, by path."""
        if not paths:
            return {}
        where = "path IN (" + ", ".join(sql_str(p) for p in paths) + ")"
        t = (self._snapshot or self.videos).search().where(where).select(columns + ["path"]).limit(len(paths)).to_arrow()
        out = {}
        for row in t.to_pylist():
            out[row["path"]] = row
        return out

    def versions(self) -> dict[str, int | None]:
        return {name: (t.version if (t := self._table(name)) is not None else None) for name in ("videos", "frames")}

    # ----- writing (hold the lock) --------------------------------------------------------

    @_disk_guard
    def repair(self) -> int:
        """Remove frames rows that no video row refers to (left by an interrupted write)."""
        videos, frames = self.videos, self.frames
        if frames is None:
            return 0
        keep = set() if videos is None else set(zip(*videos.to_arrow().select(["path", "content_hash"])
                                                   .to_pydict().values()))
        t = frames.to_arrow().select(["path", "content_hash"]).to_pydict()
        orphans = [(p, h) for p, h in zip(t["path"], t["content_hash"]) if (p, h) not in keep]
        for p, h in orphans:
            frames.delete(f"path = {sql_str(p)} AND content_hash = {sql_str(h)}")
        return len(orphans)

    @_disk_guard
    def add_video(self, record: VideoRecord, features: np.ndarray) -> None:
        """Store one video: its frame features first, then its row (replacing any older row for that path)."""
        videos, frames = self._ensure_tables()
        key = f"path = {sql_str(record.path)}"
        frames.delete(f"{key} AND content_hash = {sql_str(record.content_hash)}")
        frames.add(to_table([{"path": record.path, "content_hash": record.content_hash,
                              "timestamps": record.timestamps, "features": features}], schemas(int(self.meta["proto_dim"]), int(self.encoder_spec["dim"]))[1]))
        row = {
            "path": record.path, "size": record.size, "mtime": record.mtime, "content_hash": record.content_hash,
            "duration": record.duration, "fps": record.fps, "native_fps": record.native_fps,
            "width": record.width, "height": record.height, "n_frames": len(record.timestamps),
            "timestamps": record.timestamps, "proto_clip": record.proto_clip, "proto_frame": record.proto_frame,
            "attn_clip": record.attn_clip.ravel(), "attn_frame": record.attn_frame.ravel(),
            "encoder": self.encoder_spec["fingerprint"], "builder": self.builder_spec["fingerprint"],
            "ingested_at": time.time(),
        }
        table = to_table([row], schemas(int(self.meta["proto_dim"]), int(self.encoder_spec["dim"]))[0])
        videos.merge_insert("path").when_matched_update_all().when_not_matched_insert_all().execute(table)
        frames.delete(f"{key} AND content_hash != {sql_str(record.content_hash)}")

    @_disk_guard
    def move(self, old: str, new: str, size: int, mtime: float) -> None:
        """A file moved (same content): repoint its rows without encoding again."""
        for table in (self.frames, self.videos):
            table.update(where=f"path = {sql_str(old)}", values={"path": new})
        self.videos.update(where=f"path = {sql_str(new)}", values={"size": size, "mtime": mtime})

    @_disk_guard
    def touch(self, path: str, size: int, mtime: float) -> None:
        """Same content, new mtime: record it so the next run skips the hash."""
        self.videos.update(where=f"path = {sql_str(path)}", values={"size": size, "mtime": mtime})

    @_disk_guard
    def remove(self, paths: list[str]) -> None:
        """Forget these videos (the videos row first, so a crash leaves only orphan frames)."""
        for p in paths:
            self.videos.delete(f"path = {sql_str(p)}")
            self.frames.delete(f"path = {sql_str(p)}")

    @_disk_guard
    def recreate_videos_table(self, rows: list[dict]) -> None:
        """Replace the videos table wholesale (reindex into a prototype dim that differs)."""
        schema = schemas(int(self.meta["proto_dim"]), int(self.encoder_spec["dim"]))[0]
        table = to_table(rows, schema)
        self.db.create_table("videos", data=table, schema=schema, mode="overwrite")

    def optimize(self, grace: float | None = None) -> int:
        """Compact small fragments left by per-video commits (keeps search fast) and delete the files of table
        versions superseded more than `grace` seconds ago; returns how many versions went.

        Version v is superseded when v + 1 is written, so every version older than the newest one written
        before `grace` seconds ago can go. With grace 0, only the latest version stays.
        """
        grace = VERSION_GRACE if grace is None else grace
        pruned = 0
        for table in (self.videos, self.frames):
            if table is None:
                continue
            now = datetime.datetime.now()  # LanceDB stamps versions in naive local time
            stamps = [v["timestamp"] for v in table.list_versions()]
            settled = [t for t in stamps if (now - t).total_seconds() >= grace]
            if grace <= 0:
                older_than = datetime.timedelta(0)  # all but the latest
            else:  # keep the newest settled version and all after it (with a margin for the clock read here)
                keep_from = max(settled) if settled else min(stamps, default=now)
                older_than = now - keep_from + datetime.timedelta(seconds=2)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # LanceDB warns about grace 0, which `prvr compact` documents
                    table.optimize(cleanup_older_than=older_than)
            except Exception as e:
                raise self.unreadable(f"its {table.name} table") from e
            pruned += len(stamps) - len(table.list_versions())
        return pruned

    # ----- search matrices ----------------------------------------------------------------

    def publish(self) -> None:
        """After a write, cache the newest version's search matrices, so the next search (torch-free) starts at once.

        A failure here loses no data: the next search builds them instead.
        """
        try:
            if self.count():
                self.search_matrices()
        except (OSError, DiskError, CorruptError) as e:
            warnings.warn(f"index {self.root}: the search cache was not refreshed ({e}); the next search builds it",
                          stacklevel=2)

    def search_matrices(self, retrain: bool = False) -> SearchMatrices:
        """Every video's path, content hash and prototypes per branch, cached per table version (`matrices`).

        The version read here is the snapshot that `rows` reads highlights from, so one search sees one version.
        A cache built now with `retrain` trains its approximate candidates afresh (`prvr optimize`).
        """
        table = self.videos
        if table is None or table.count_rows() == 0:
            raise IndexMissingError(f"index {self.root} is empty; add videos with `prvr ingest PATH`")
        self._snapshot = table
        return load_matrices(table, int(self.meta["proto_dim"]), cache_folders(self.root, self.cache_dir), retrain)
