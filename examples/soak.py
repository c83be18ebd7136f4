"""Soak test: ingest and search in a loop for a set time, measuring memory and checking the index each round.

    python examples/soak.py --minutes 10 [--workdir DIR] [--clip-model tests/fixtures/prvr-tiny-clip.json]

Each round adds two synthesized videos, rewrites one (a changed file), touches
one, deletes one now and then (ingest --prune), runs `prvr ingest`, then a few
searches, all in this one process (so a leak shows up as growing memory). After
each round the index must hold exactly the files present, each complete. Prints
one JSON summary line; exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--clip-model", default=str(ROOT / "tests" / "fixtures" / "prvr-tiny-clip.json"))
    ap.add_argument("--clip-pretrained", default="none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from prvr_cli.cli import main as prvr
    from prvr_cli.pipeline.discover import content_hash
    from prvr_cli.index.store import Index
    from tests.helpers import PALETTE, make_video

    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prvr-soak-"))
    lib, index = work / "lib", work / "index"
    os.environ.update(XDG_CACHE_HOME=str(work / "cache"), XDG_CONFIG_HOME=str(work / "config"))
    devnull = open(os.devnull, "w")
    clip = ["--clip-model", args.clip_model, "--clip-pretrained", args.clip_pretrained]
    n_made, rounds, searches, failures, rss = 0, 0, 0, [], []
    ingest_seconds = []
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        rounds += 1
        for _ in range(2):
            make_video(lib / f"s{n_made:05d}.mp4", [PALETTE[rng.randrange(6)] for _ in range(rng.randint(1, 4))])
            n_made += 1
        files = sorted(lib.iterdir())
        make_video(rng.choice(files), [PALETTE[rng.randrange(6)] for _ in range(2)])
        t = time.time() + rounds
        os.utime(rng.choice(files), (t, t))
        prune = rounds % 5 == 0
        if prune:
            rng.choice(files).unlink()
        started = time.monotonic()
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = devnull
        try:
            code = prvr(["ingest", str(lib), "--index", str(index), "--quiet", *clip] + (["--prune"] if prune else []))
            for q in ("a red screen", "green then blue", "something moving"):
                searches += 1
                if prvr(["search", q, "--index", str(index), "-k", "5"]) != 0:
                    failures.append(f"round {rounds}: search {q!r} failed")
        finally:
            sys.stdout, sys.stderr = saved
        ingest_seconds.append(time.monotonic() - started)
        if code != 0:
            failures.append(f"round {rounds}: ingest exited {code}")
        idx = Index.open(index)
        states = idx.file_states()
        expect = {str(p): content_hash(p) for p in lib.iterdir()}
        if {p: s[2] for p, s in states.items()} != expect:
            failures.append(f"round {rounds}: index does not match the folder")
        if sum(1 for _ in idx.iter_frame_features()) != len(expect):
            failures.append(f"round {rounds}: frame features missing")
        rss.append(round(rss_mb(), 1))
        print(f"round {rounds}: {len(expect)} videos, rss {rss[-1]} MB, {ingest_seconds[-1]:.1f}s", file=sys.stderr)
    settled = rss[min(len(rss) - 1, max(1, len(rss) // 5))]  # after warm-up (first fifth of the rounds)
    summary = {"minutes": args.minutes, "rounds": rounds, "videos": len(list(lib.iterdir())), "made": n_made,
               "searches": searches, "failures": failures, "rss_mb_first": rss[0], "rss_mb_after_warmup": settled,
               "rss_mb_last": rss[-1], "rss_mb_max": max(rss),
               "round_seconds_first": round(ingest_seconds[0], 2), "round_seconds_last": round(ingest_seconds[-1], 2),
               "index_mb": round(sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) / 2**20, 1)}
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
