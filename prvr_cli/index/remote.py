"""An index on object storage (`--index s3://bucket/prefix`).

Its tables live there, read and written by LanceDB itself. Its small files (index.json, model.pt and the
exported query side under text/) are mirrored in a local folder under the user's cache. The mirror also holds
what is only ever local: the search cache and the writer lock. A writer uploads the small files when it lets
go of the index; every command that opens it downloads those that changed.

The folder says it is a mirror: `remote.json` holds the location, so the cold search path (`matrices.published`)
asks the object store for the newest table version instead of a local folder.

Credentials and endpoint come from the usual AWS variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION (or AWS_DEFAULT_REGION), and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an
S3-compatible server (MinIO, Ceph, a local test server).

The writer lock is a file lock in the mirror (one writer per machine) plus an advisory lease object beside the
tables (`writer.json`), so that a second machine refuses to write while another one is. The lease is not atomic:
two machines that start writing in the same instant may both go on (README, "An index on object storage").
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from ..errors import LockedError, RemoteError, UsageError
from .meta import META_FILE, TEXT_FOLDER

SCHEMES = ("s3://",)
MARKER = "remote.json"          # in a mirror folder: the location it mirrors
LEASE = "writer.json"           # beside the tables: which machine writes now
MIRRORED = (META_FILE, "model.pt")   # plus every file under text/
CHUNK = 8 << 20


def is_remote(location) -> bool:
    return str(location).startswith(SCHEMES)


def local_folder(location, cache_home: Path) -> Path:
    """The folder that stands for an index: its own folder, or the local mirror of an s3:// index."""
    if is_remote(location):
        return RemoteIndex.mirror_of(str(location), cache_home)
    return Path(location).expanduser().resolve()


def manifest_version(name: str) -> int | None:
    """The table version a Lance manifest file name stands for (by its version, or by 2^64 - 1 minus it)."""
    stem, _, ext = name.rpartition("/")[2].partition(".")
    if ext != "manifest" or not stem.isdigit():
        return None
    n = int(stem)
    return n if n < 1 << 63 else (1 << 64) - 1 - n


class RemoteIndex:
    """The object-storage side of one remote index and its local mirror folder."""

    def __init__(self, uri: str, mirror: Path):
        uri = uri.rstrip("/")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket or not prefix or "//" in prefix:
            raise UsageError(f"--index {uri}: give a bucket and a folder in it, like s3://bucket/prvr-index")
        self.uri, self.bucket, self.prefix, self.mirror = uri, bucket, prefix, Path(mirror)
        self._fs = None

    @classmethod
    def at(cls, uri: str, cache_home: Path) -> "RemoteIndex":
        """The remote index at `uri`, mirrored under `cache_home`/remote (a folder per location)."""
        return cls(uri, cls.mirror_of(uri, cache_home))

    @staticmethod
    def mirror_of(uri: str, cache_home: Path) -> Path:
        return Path(cache_home) / "remote" / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]

    @staticmethod
    def marked(folder: Path) -> "RemoteIndex | None":
        """The remote index a mirror folder stands for, or None for an ordinary index folder."""
        try:
            return RemoteIndex(json.loads((Path(folder) / MARKER).read_text())["uri"], folder)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ----- connection ------------------------------------------------------------------------

    @property
    def db_uri(self) -> str:
        return f"{self.uri}/db"

    @staticmethod
    def _endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def storage_options(self) -> dict:
        """LanceDB's options for this location, from the AWS variables (unset ones are left to its defaults)."""
        env = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
               "aws_session_token": "AWS_SESSION_TOKEN"}
        opts = {key: os.environ[var] for key, var in env.items() if os.environ.get(var)}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["aws_region"] = region
        endpoint = self._endpoint()
        if endpoint:
            opts["aws_endpoint"] = endpoint
            if endpoint.startswith("http://"):
                opts["allow_http"] = "true"
        return opts

    @property
    def fs(self):
        """pyarrow's S3 file system for the small files and listings."""
        if self._fs is None:
            from pyarrow import fs

            kwargs = {}
            endpoint = self._endpoint()
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kwargs["region"] = region
            if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
                kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                              secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                              session_token=os.environ.get("AWS_SESSION_TOKEN"))
            self._fs = fs.S3FileSystem(connect_timeout=5, request_timeout=30, **kwargs)
        return self._fs

    def _key(self, relative: str = "") -> str:
        return f"{self.bucket}/{self.prefix}/{relative}".rstrip("/")

    def _call(self, what: str, fn, *args):
        """Run an object-store call; its failures become one line naming the location and what to check."""
        try:
            return fn(*args)
        except OSError as e:
            reason = " ".join(str(e).split())[:200]
            raise RemoteError(f"{self.uri}: cannot {what} ({reason}); check the address, AWS_ENDPOINT_URL and "
                              "the AWS credentials") from e

    def _listing(self, relative: str) -> dict[str, tuple[int, float]]:
        """{relative path: (size, modified time)} of the files under `relative` (empty when there are none)."""
        from pyarrow import fs

        base = self._key()
        selector = fs.FileSelector(self._key(relative), recursive=True, allow_not_found=True)
        infos = self._call("list the index's files", self.fs.get_file_info, selector)
        return {i.path[len(base) + 1:]: (i.size, i.mtime.timestamp() if i.mtime else 0.0)
                for i in infos if i.type == fs.FileType.File}

    # ----- the small files -------------------------------------------------------------------

    def _small_files(self) -> dict[str, tuple[int, float]]:
        from pyarrow import fs

        found = self._listing(TEXT_FOLDER)
        infos = self._call("read the index's files", self.fs.get_file_info, [self._key(n) for n in MIRRORED])
        for name, info in zip(MIRRORED, infos):
            if info.type == fs.FileType.File:
                found[name] = (info.size, info.mtime.timestamp() if info.mtime else 0.0)
        return found

    def _exists(self, relative: str) -> bool:
        from pyarrow import fs

        info = self._call("read the index's files", self.fs.get_file_info, self._key(relative))
        return info.type == fs.FileType.File

    def pull(self) -> None:
        """Bring the mirror up to date: download each small file that is new or changed, drop those gone."""
        self.mirror.mkdir(parents=True, exist_ok=True)
        (self.mirror / MARKER).write_text(json.dumps({"uri": self.uri}))
        remote = self._small_files()
        for relative, (size, mtime) in remote.items():
            local = self.mirror / relative
            try:
                st = local.stat()
                if st.st_size == size and st.st_mtime == mtime:
                    continue
            except OSError:
                pass
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
            try:
                self._call(f"download {relative}", self._download, relative, tmp)
                os.utime(tmp, (mtime, mtime))
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        for local in self._local_small_files():
            if local.relative_to(self.mirror).as_posix() not in remote:
                local.unlink(missing_ok=True)

    def _local_small_files(self) -> list[Path]:
        text = self.mirror / TEXT_FOLDER
        files = [p for p in text.rglob("*") if p.is_file() and not p.name.startswith(".")] if text.is_dir() else []
        return files + [self.mirror / n for n in MIRRORED if (self.mirror / n).is_file()]

    def push(self) -> None:
        """Upload the small files the writer changed (index.json last, so it never names files not yet there)."""
        remote = self._small_files()
        local = sorted(self._local_small_files(), key=lambda p: p.name == META_FILE)
        for path in local:
            relative = path.relative_to(self.mirror).as_posix()
            st = path.stat()
            if remote.get(relative, (None, None))[0] == st.st_size and remote[relative][1] == st.st_mtime:
                continue
            self._call(f"upload {relative}", self._upload, path, relative)
            info = self._call(f"upload {relative}", self.fs.get_file_info, self._key(relative))
            mtime = info.mtime.timestamp() if info.mtime else st.st_mtime
            os.utime(path, (mtime, mtime))   # what pull compares: the copy is then current
        present = {p.relative_to(self.mirror).as_posix() for p in local}
        for relative in set(remote) - present:
            self._call(f"delete {relative}", self.fs.delete_file, self._key(relative))

    # ----- tables and usage --------------------------------------------------------------------

    def latest_version(self, table: str = "videos") -> int | None:
        """The newest committed version of a table, from its manifest names (None if there is none)."""
        names = self._listing(f"db/{table}.lance/_versions")
        return max((v for v in map(manifest_version, names) if v is not None), default=None)

    def disk_usage(self) -> int:
        """Bytes stored at the location."""
        return sum(size for size, _ in self._listing("").values())

    # ----- the writer's lease ----------------------------------------------------------------

    def take_lease(self) -> None:
        """Record this machine as the writer; refuse while another machine's lease is there."""
        me = socket.gethostname()
        if self._exists(LEASE):
            try:
                with self.fs.open_input_stream(self._key(LEASE)) as f:
                    holder = json.loads(f.read())
            except (OSError, ValueError):
                holder = {}
            # this machine's own lease is stale: the local file lock, held now, says no writer of ours is left
            if holder.get("host") != me:
                since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(holder.get("since", 0)))
                raise LockedError(f"index {self.uri} is being written from {holder.get('host', 'another machine')} "
                                  f"(pid {holder.get('pid', '?')}, since {since}); wait for it, or if that writer "
                                  f"is gone, delete {self.uri}/{LEASE}")
        lease = json.dumps({"host": me, "pid": os.getpid(), "since": time.time()}).encode()
        self._call("record the writer", self._write, LEASE, lease)

    def drop_lease(self) -> None:
        self._call("release the writer", self.fs.delete_file, self._key(LEASE))

    def _write(self, relative: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._key(relative)) as f:
            f.write(data)

    def _download(self, relative: str, local: Path) -> None:
        with self.fs.open_input_stream(self._key(relative)) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)

    def _upload(self, local: Path, relative: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(self._key(relative)) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
