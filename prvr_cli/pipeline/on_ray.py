"""Ingest on Ray: the decode, encode and prototype stages run on a Ray cluster's workers; the commit stays here.

`prvr ingest --ray ADDRESS` spreads the files that the plan encodes over `workers` Ray actors. Each actor
loads the CLIP encoder and the prototype builder once (on a GPU where the cluster has them) and, per
file, decodes it, encodes its frames and builds its prototypes. The results come back to this process,
the one committer, which writes each video in its own commit as a local ingest does: a video is complete
or absent, a rerun skips what is stored (and so resumes after the driver is killed), and a file that
fails is one line. An actor that dies (a killed worker, a crashed decoder) is restarted by Ray and its
file retried, up to RETRIES times; after that the file is reported as failed. Every node must read the
files, and the model checkpoint, at the same paths (a shared mount).

Ray is an optional extra (`pip install 'prvr[ray]'`): only this module imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DecodeError, UsageError

RETRIES = 2             # re-runs of a file whose actor died
LOCAL = "local"         # start a Ray instance on this machine for this ingest


@dataclass(frozen=True)
class Recipe:
    """What an actor needs to load the index's encoder and builder by itself."""

    clip_model: str
    clip_pretrained: str
    model: str | None
    device: str
    cache_dir: str


class EncodeWorker:
    """One Ray actor: the encoder and builder loaded once, then one file per call."""

    def __init__(self, recipe: Recipe):
        from ..devices import resolve_device
        from .encode import FrameTextEncoder
        from .prototypes import load_builder

        device = resolve_device(recipe.device)
        self.encoder = FrameTextEncoder.load(recipe.clip_model, recipe.clip_pretrained, device,
                                             cache_dir=recipe.cache_dir)
        self.builder = load_builder(recipe.model, self.encoder.spec(), device)

    def encode(self, path: str, fps: float, batch_size: int, decoder: str) -> dict:
        """{"info", "features" [T, D] float16, "timestamps", "protos"} of one file, or {"error": one line}."""
        from .decode import decode_frames

        try:
            info, chunks = decode_frames(Path(path), fps, self.encoder.image_size, batch_size, decoder)
            feats, stamps = [], []
            for c in chunks:
                feats.append(self.encoder.encode_images(c.frames))
                stamps.append(c.timestamps)
            if not feats:
                return {"error": f"{path}: no frames could be decoded"}
            feats = np.concatenate(feats)
            return {"info": info, "features": feats, "timestamps": np.concatenate(stamps),
                    "protos": self.builder.build(feats.astype(np.float32))}
        except DecodeError as e:
            return {"error": str(e)}
        except Exception as e:   # any other failure of one file must not stop the run
            return {"error": f"{path}: cannot encode ({type(e).__name__}: {str(e)[:120]})"}


def connect(address: str, workers: int):
    """The ray module, connected to the cluster at `address` (`local`: a new one on this machine)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'prvr[ray]'") from None
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            if address == LOCAL:
                # Ray runs its workers at niceness 15 (its worker_niceness setting), so on a busy machine they would
                # wait behind everything else; a local ingest's actors are the ingest, and run at normal priority
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--ray {address}: cannot connect to a Ray cluster there ({str(e)[:160]}); start one "
                             "with `ray start --head`, or use --ray local") from e
    return ray


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """A usage error unless `address` (host:port or ray://host:port) accepts a connection: Ray itself would retry
    an unreachable cluster for minutes."""
    import socket

    if address in (LOCAL, "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UsageError(f"--ray {address}: no Ray cluster answers there ({e}); start one with `ray start --head` "
                         "and give its address (host:6379, or ray://host:10001), or use --ray local") from None


def encode_on_ray(jobs: list, recipe: Recipe, commit, fail, *, address: str, workers: int, fps: float,
                  batch_size: int, decoder: str) -> None:
    """Encode each job's file (`job.state.path`) on Ray actors; `commit(i, result)` each success here, in the
    order they finish, and `fail(i, message)` each failure."""
    ray = connect(address, workers)
    gpus = ray.cluster_resources().get("GPU", 0)
    actor_class = ray.remote(max_restarts=-1, max_task_retries=RETRIES)(EncodeWorker)
    options = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    actors = [actor_class.options(**options).remote(recipe) for _ in range(max(1, min(workers, len(jobs))))]
    waiting = list(range(len(jobs)))[::-1]
    running: dict = {}     # future -> (job, actor)
    try:
        def submit(actor) -> None:
            if waiting:
                i = waiting.pop()
                running[actor.encode.remote(str(jobs[i].state.path), fps, batch_size, decoder)] = (i, actor)

        for actor in actors:
            submit(actor)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                fail(i, f"{jobs[i].state.path}: the Ray worker died {RETRIES + 1} times on this file "
                        f"({str(e).splitlines()[0][:120]})")
            except ray.exceptions.RayError as e:
                fail(i, f"{jobs[i].state.path}: Ray could not run the encoding ({str(e).splitlines()[0][:120]})")
            else:
                if "error" in result:
                    fail(i, result["error"])
                else:
                    commit(i, result)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
