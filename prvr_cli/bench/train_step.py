"""`prvr bench train`: milliseconds per training step of a config on a dataset, and where the time goes.

The steps are `Trainer.step` itself (forward, backward, clipping, AdamW, schedule) on the first batches
of epoch 1, after a few warm-up steps; batch preparation (gathering and padding the batch's frames and
tokens) is timed apart. With `profile`, torch's profiler lists the operators by their own CPU time.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..errors import UsageError
from ..training.loop import Trainer, epoch_batches
from .common import load_average, machine


def bench_train_step(data, config: dict, device: str = "cpu", steps: int = 20, warmup: int = 3, seed: int = 0,
                     profile: bool = False) -> dict:
    """Median milliseconds of batch preparation and of one training step, over `steps` steps after `warmup`."""
    if steps < 1 or warmup < 0:
        raise UsageError(f"--steps {steps} / --warmup {warmup}: time at least 1 step after 0 or more warm-up steps")
    with tempfile.TemporaryDirectory(prefix="prvr-bench-train-") as tmp:
        trainer = Trainer(config, data, Path(tmp) / "run", device=device, seed=seed)
        train = data.splits["train"]
        batches = iter(epoch_batches(train, int(trainer.settings.batch_videos), seed, 0))
        prepare, step, table = [], [], None
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise UsageError(f"the training split has only {i} batches of {trainer.settings.batch_videos} "
                                 "videos; ask for fewer --steps")
            t1 = time.perf_counter()
            if profile and i == warmup:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            trainer.step(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= warmup:
                prepare.append(t1 - t0)
                step.append(t2 - t1)
        if profile:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"preset": config.get("preset"), "method": config["method"], "device": str(trainer.device),
            "batch_videos": int(trainer.settings.batch_videos), "steps": steps, "warmup": warmup,
            "prepare_ms": round(statistics.median(prepare) * 1e3, 2),
            "step_ms": round(statistics.median(step) * 1e3, 1),
            "step_ms_min_max": [round(min(step) * 1e3, 1), round(max(step) * 1e3, 1)],
            "torch_threads": torch.get_num_threads(), "profile": table, "machine": machine(),
            "load_average": load_average()}
