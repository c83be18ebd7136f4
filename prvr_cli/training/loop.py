"""The training loop shared by every retrieval method.

Each step sees `batch_videos` videos with all their queries (videos reshuffled every
epoch in a seeded order), AdamW with a linear warm-up then the schedule's rate per step
(`make_schedule`) and gradient clipping. After every epoch the model is scored on the val
split; the best epoch by val SumR is kept as `best.pt`, the latest as `last.pt` (with
optimizer, scheduler and RNG state and the model's `training_state`, so that `--resume`
continues exactly where the run stopped), and training stops early after `patience`
epochs without improvement. The best checkpoint is finally scored on the test split.
Everything goes to the run folder: `best.pt`, `last.pt`, `metrics.json`.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .datasets import PRVRData, Split, counted
from ..errors import DataError, PrvrError, UsageError
from .evaluate import evaluate
from ..nets.config import STOP_KEYS, TrainConfig
from ..nets.factory import canonical, create_model, override, save_checkpoint
from ..nets.retrieval import TrainBatch
from ..devices import resolve_device

# STOP_KEYS may change when a run is resumed: they only decide when to stop.
# (Raising max_epochs stretches the remaining linear decay over the new total.)
# Below this many val videos, val recall is too coarse to select an epoch (a warning says so).
MIN_VAL_VIDEOS = 10


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_settings(config: dict) -> TrainConfig:
    """The config's training section, typed and complete."""
    return TrainConfig.from_dict(config.get("train"), "train")


def make_optimizer(model: torch.nn.Module, settings: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": float(settings.weight_decay)},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(settings.lr))


def make_schedule(optimizer, total_steps: int, warmup: float, schedule: str, cooldown: float = 0.2):
    """Per-step multiplier: linear warm-up over `warmup` of the steps, then one of
    linear decay to 0 ("linear"), the full rate ("constant"), or the full rate until the last
    `cooldown` share of the steps and a linear decay to 0 over those ("cooldown", warmup-stable-decay)."""
    warm = max(1, round(warmup * total_steps))
    decay_from = {"linear": warm, "constant": math.inf}.get(schedule)
    if decay_from is None:
        decay_from = max(warm, total_steps - max(1, round(cooldown * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step < decay_from:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_from))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(split: Split, batch_videos: int, seed: int, epoch: int):
    """TrainBatches of one epoch: a seeded shuffle of the videos cut into near-equal batches."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(split.n_videos, generator=gen)
    n_batches = math.ceil(split.n_videos / batch_videos)
    for videos in torch.tensor_split(order, n_batches):
        frames, frame_mask = split.frames.batch(videos)
        queries, owner = split.queries_of(videos)
        tokens, token_mask = split.tokens.batch(queries)
        yield TrainBatch(frames, frame_mask, tokens, token_mask, owner, epoch, videos)


def feature_source(data: PRVRData) -> dict:
    return dict(data.source)


def check_resume(payload: dict, config: dict, data: PRVRData, path: Path) -> None:
    """A run resumes only on the same data dims, feature source and config."""
    dims = payload.get("dims", {})
    if (dims.get("video"), dims.get("text")) != (data.video_dim, data.text_dim):
        raise DataError(f"{path} was trained on video/text dims {dims.get('video')}/{dims.get('text')}, "
                        f"but the data has {data.video_dim}/{data.text_dim}; train into a new --out")
    old_src = payload.get("feature_source", {})
    for key in ("layout", "collection", "feature", "train_subset"):
        if old_src.get(key) != data.source.get(key):
            raise DataError(f"{path} was trained on {key} {old_src.get(key)!r}, the data given is "
                            f"{data.source.get(key)!r}; pass the same data or train into a new --out")
    old = canonical(payload["config"])
    diff = sorted(k for k in flat_keys(old) | flat_keys(config)
                  if lookup(old, k) != lookup(config, k) and k not in {f"train.{x}" for x in STOP_KEYS})
    if diff:
        raise UsageError(f"{path} was trained with a different {diff[0]} ({lookup(old, diff[0])!r} vs "
                         f"{lookup(config, diff[0])!r}); resume with the original settings or use a new --out")


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return keys


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def format_metrics(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@100", "SumR"))


class Trainer:
    """Trains one model on one dataset into one run folder."""

    def __init__(self, config: dict, data: PRVRData, out: Path, device: str = "auto", seed: int = 0,
                 resume: bool = False, console: Console | None = None):
        self.data, self.out, self.seed = data, Path(out), seed
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.device = torch.device(resolve_device(device))
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        if "val" not in data.splits:
            raise DataError("the dataset has no val split; training needs one to select the best epoch")
        payload = None
        if resume:
            payload = self._load_last(config)
            config = override(payload["config"], {f"train.{k}": config["train"][k] for k in STOP_KEYS
                                                   if k in config.get("train", {})})
        elif self.last_path.exists():
            raise UsageError(f"{self.out} already holds a run (last.pt); pass --resume to continue it "
                             "or choose another --out")
        self.config = canonical(config)
        self.settings = train_settings(self.config)

        seed_everything(seed)
        self.model = create_model(self.config, video_dim=data.video_dim, text_dim=data.text_dim).to(self.device)
        self.optimizer = make_optimizer(self.model, self.settings)
        train = data.splits["train"]
        self.steps_per_epoch = math.ceil(train.n_videos / int(self.settings.batch_videos))
        total = self.steps_per_epoch * int(self.settings.max_epochs)
        self.scheduler = make_schedule(self.optimizer, total, float(self.settings.warmup), self.settings.schedule,
                                       float(self.settings.cooldown))
        self.epoch, self.best, self.bad_epochs, self.history = 0, None, 0, []
        if payload is not None:
            self._restore(payload)

    # -- checkpoints ------------------------------------------------------------

    def _load_last(self, config: dict) -> dict:
        if not self.last_path.is_file():
            raise UsageError(f"--resume: {self.last_path} not found; start a new run without --resume")
        try:
            payload = torch.load(self.last_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UsageError(f"--resume: {self.last_path} is unreadable ({type(e).__name__}); start a new run") from e
        if "optimizer" not in payload:
            raise UsageError(f"--resume: {self.last_path} has no optimizer state; "
                             "it is not a last.pt from `prvr train`")
        if payload.get("seed") != self.seed:
            raise UsageError(f"--resume: {self.last_path} was trained with --seed {payload.get('seed')}, "
                             f"not {self.seed}; resume with the same seed")
        check_resume(payload, canonical(config), self.data, self.last_path)
        return payload

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["state_dict"])
        self.model.load_training_state(payload.get("training_state", {}))  # absent in runs saved before it
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        # the optimizer holds the rate of the stored schedule's next step; with --epochs raised the schedule
        # (rebuilt over the new total) gives another one, and the next step must already use it
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.epoch, self.best = payload["epoch"], payload["best"]
        self.bad_epochs, self.history = payload["bad_epochs"], payload["history"]
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _save_last(self) -> None:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        save_checkpoint(self.last_path, self.model, feature_source=feature_source(self.data),
                        metrics=self.history[-1]["val"] if self.history else {},
                        extra={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "epoch": self.epoch, "best": self.best, "bad_epochs": self.bad_epochs,
                               "history": self.history, "rng": rng, "seed": self.seed,
                               "training_state": self.model.training_state()})

    # -- loop -------------------------------------------------------------------

    def train_epoch(self, progress: Progress) -> dict:
        """One pass over the training videos; returns the mean of each loss term."""
        self.model.train()
        train = self.data.splits["train"]
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.settings.max_epochs}", total=self.steps_per_epoch,
                                 loss="")
        sums, steps = {}, 0
        for batch in epoch_batches(train, int(self.settings.batch_videos), self.seed, self.epoch):
            loss, terms = self.step(batch)
            if not torch.isfinite(loss):
                raise PrvrError(f"training loss became {loss.item()} at epoch {self.epoch + 1}, step {steps + 1}; "
                                "lower --lr or check the features", exit_code=1)
            steps += 1
            for k, v in {"loss": loss.item(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            progress.update(task, advance=1, loss=f"loss {sums['loss'] / steps:.4f}")
            if not self.console.is_terminal and steps % max(1, self.steps_per_epoch // 10) == 0:
                self.console.print(f"  epoch {self.epoch + 1} step {steps}/{self.steps_per_epoch} "
                                   f"loss {sums['loss'] / steps:.4f}")  # a log file gets no live bar
        progress.remove_task(task)
        return {k: v / steps for k, v in sums.items()}

    def step(self, batch: TrainBatch) -> tuple[torch.Tensor, dict]:
        """One optimiser step on `batch`: forward, backward, gradient clipping, update, schedule."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.autocast == "bf16"):
            loss, terms = self.model(batch.to(self.device))
        if torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.settings.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
        return loss, terms

    def run(self) -> dict:
        """Train until max_epochs or early stop, then score the best checkpoint on test."""
        self.out.mkdir(parents=True, exist_ok=True)
        max_epochs, patience = int(self.settings.max_epochs), int(self.settings.patience)
        self.console.print(f"[bold]prvr train[/] {self.config.get('preset', self.config['method'])} on "
                           f"{self.data.summary()} | device {self.device} | {self.steps_per_epoch} steps/epoch")
        n_val = self.data.splits["val"].n_videos
        if n_val < MIN_VAL_VIDEOS:
            warnings.warn(f"the val split holds only {counted(n_val, 'video')}, so val recall is coarse (a query ranks "
                          f"among {n_val}) and picks the best epoch poorly; with your own videos, 10% of the captioned "
                          f"videos are held out for val, so caption {MIN_VAL_VIDEOS * 10} or more")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            while self.epoch < max_epochs and not (self.history and self.bad_epochs >= patience):
                start = time.perf_counter()
                losses = self.train_epoch(progress)
                train_s = time.perf_counter() - start
                val = evaluate(self.model, self.data.splits["val"], self.device)
                self.epoch += 1
                # A tie goes to the later, longer-trained epoch: a tiny val split saturates at SumR 400.
                improved = self.best is None or val["SumR"] >= self.best["val"]["SumR"]
                self.history.append({"epoch": self.epoch, "losses": losses, "val": val, "train_seconds": train_s,
                                     "eval_seconds": time.perf_counter() - start - train_s})
                if improved:
                    self.best, self.bad_epochs = {"epoch": self.epoch, "val": val}, 0
                    save_checkpoint(self.best_path, self.model, feature_source=feature_source(self.data), metrics=val,
                                    extra={"epoch": self.epoch, "seed": self.seed})
                else:
                    self.bad_epochs += 1
                self._save_last()
                terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                progress.console.print(f"epoch {self.epoch:3d} | {terms} | val {format_metrics(val)} | "
                                       f"{train_s:.0f}s{' | best' if improved else ''}")
                self.write_metrics(status="running")
        if self.history and self.bad_epochs >= patience and self.epoch < max_epochs:
            self.console.print(f"early stop: val SumR has not improved for {patience} epochs")
        return self.finish()

    def finish(self) -> dict:
        """Score the best checkpoint on test (when there is one) and write metrics.json."""
        test = None
        if "test" in self.data.splits and self.best_path.exists():
            state = torch.load(self.best_path, map_location=self.device, weights_only=False)["state_dict"]
            self.model.load_state_dict(state)
            test = evaluate(self.model, self.data.splits["test"], self.device)
            self.console.print(f"test (best epoch {self.best['epoch']}): {format_metrics(test)}")
        return self.write_metrics(status="done", test=test)

    def write_metrics(self, status: str, test: dict | None = None) -> dict:
        train_times = [h["train_seconds"] for h in self.history]
        summary = {
            "status": status, "run_dir": str(self.out), "preset": self.config.get("preset"),
            "method": self.config["method"], "device": str(self.device), "seed": self.seed,
            "epochs": self.epoch, "best_epoch": self.best["epoch"] if self.best else None,
            "val": self.best["val"] if self.best else None, "test": test,
            "seconds_per_epoch": sum(train_times) / len(train_times) if train_times else None,
            "data": {**self.data.source, **{f"{n}_videos": s.n_videos for n, s in self.data.splits.items()},
                     **{f"{n}_queries": s.n_queries for n, s in self.data.splits.items()}},
            "config": self.config, "history": self.history,
            "checkpoints": {"best": str(self.best_path), "last": str(self.last_path)},
        }
        tmp = self.out / "metrics.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.out / "metrics.json")
        return summary


def train(config: dict, data: PRVRData, out: Path, device: str = "auto", seed: int = 0, resume: bool = False,
          console: Console | None = None) -> dict:
    """Train `config` on `data` into the run folder `out`; returns the metrics.json summary."""
    return Trainer(config, data, out, device=device, seed=seed, resume=resume, console=console).run()
