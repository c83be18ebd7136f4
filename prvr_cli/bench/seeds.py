"""`prvr bench seeds`: the seed spread of runs made with different `--seed`s: mean and min-max per row.

Reads `prvr bench accuracy --json` records (every table row of every record; accuracy as stored, float16) and
`prvr train` run folders (their metrics.json, float32: one row, labelled by the run's preset or LABEL=FOLDER),
groups the rows by (collection, table, label), and
reports test R@K and SumR as the mean with the lowest and highest value. A difference between two rows is worth
claiming only when it is larger than both rows' spreads.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..errors import UsageError

KEYS = ("R@1", "R@5", "R@10", "R@100", "SumR")


def _rows(path: Path) -> list[dict]:
    """(collection, table, label, seed, test metrics, bytes per video) of each row of one record or run folder."""
    source = path / "metrics.json" if path.is_dir() else path
    try:
        record = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{source}: not a readable bench accuracy record or run folder ({e})") from None
    if "results" in record:
        return [{"collection": record["data"].get("collection"), "table": table, "label": label,
                 "seed": record["seed"], "metrics": r["metrics"], "bytes": r.get("bytes_per_video")}
                for r in record["results"] for table, label in r["rows"]]
    if "test" in record and "seed" in record:
        return [{"collection": record["data"].get("collection"), "table": "methods",
                 "label": Path(str(record.get("preset") or source.parent.name)).stem, "seed": record["seed"],
                 "metrics": record["test"], "bytes": None}]
    raise UsageError(f"{source}: neither a `prvr bench accuracy --json` record nor a `prvr train` run")


def aggregate(paths: list[str | Path]) -> list[dict]:
    """One entry per (collection, table, label): its seeds, and per metric the mean, min and max.

    A path written LABEL=PATH gives a `prvr train` run folder its row label (default: its preset's name).
    """
    groups: dict[tuple, list[dict]] = {}
    for given in paths:
        label, eq, path = str(given).partition("=")
        if not eq or "/" in label:
            label, path = None, str(given)
        for row in _rows(Path(path)):
            row["label"] = label or row["label"]
            groups.setdefault((row["collection"], row["table"], row["label"]), []).append(row)
    out = []
    for (collection, table, label), rows in groups.items():
        seeds = [r["seed"] for r in rows]
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"{label} ({collection}) has seed {max(seeds, key=seeds.count)} more than once; "
                             "pass each run once")
        stats = {k: {"mean": statistics.fmean(r["metrics"][k] for r in rows),
                     "min": min(r["metrics"][k] for r in rows), "max": max(r["metrics"][k] for r in rows)}
                 for k in KEYS}
        out.append({"collection": collection, "table": table, "label": label, "seeds": sorted(seeds),
                    "bytes_per_video": next((r["bytes"] for r in rows if r["bytes"]), None), "metrics": stats})
    return sorted(out, key=lambda e: (e["collection"] or "", e["table"], -e["metrics"]["SumR"]["mean"]))


def markdown(entries: list[dict]) -> str:
    lines = ["| collection | model | seeds | R@1 | R@5 | R@10 | R@100 | **SumR mean** | SumR min-max | bytes/video |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e["metrics"]
        lines.append(f"| {e['collection']} | {e['label']} | {','.join(map(str, e['seeds']))} | "
                     + " | ".join(f"{m[k]['mean']:.2f}" for k in KEYS[:4])
                     + f" | **{m['SumR']['mean']:.2f}** | {m['SumR']['min']:.2f}-{m['SumR']['max']:.2f} | "
                     + (f"{e['bytes_per_video']:,}" if e["bytes_per_video"] else "") + " |")
    return "\n".join(lines)
