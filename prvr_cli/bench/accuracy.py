"""`prvr bench accuracy`: every method trained the same way on one dataset, then measured on its test split.

Variants, each trained into its own run folder under `runs`:

    methods     each preset as it is (ProtoPRVR, MS-SL, GMMFormer by default)
    ablation    ProtoPRVR with its auxiliary losses added in turn to the retrieval losses (the paper's Table 4)
    prototypes  ProtoPRVR with 10, 20, 30 and 60 prototypes per branch (the paper's Table 5)
    msc         (on request) GMMFormer-v2, then TCPL, CBVA, token merging and adaptive CBVA added in turn (MSC)
    remedies    (on request) ProtoPRVR with each of MSC's remedies alone, and all three

Variants with the same config share one run (the full ProtoPRVR appears in all three tables).
Every variant gets the same budget (epochs, batch size, training videos). A finished run with
the same config, seed and data is reused, an unfinished one is resumed, and a folder holding a
different run is an error: nothing is overwritten.

Each run's best checkpoint (by val SumR) is scored on the test split once per storage type
(float32, float16, int8); the headline numbers are float16's, the storage of an index.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import quantize
from .common import load_average, matching_flops
from .storage import storage_metrics
from ..errors import UsageError
from ..nets.config import STOP_KEYS
from ..nets.factory import canonical, list_presets, load_checkpoint, load_config, override
from ..training.loop import train

AUX_LOSSES = ("crecon", "urecon", "attn", "ortho")   # added in this order in the ablation
TABLES = ("methods", "ablation", "prototypes", "msc", "remedies")
DEFAULT_TABLES = ("methods", "ablation", "prototypes")
# MSC's ablation in the paper's shape: GMMFormer-v2, then each remedy added in turn (the last row is MSC)
MSC_STEPS = (("GMMFormer-v2", {"tcpl_distance_weight": 0.0, "tcpl_angle_weight": 0.0, "cbva_weight": 0.0,
                               "token_merge": False, "cbva_adaptive": False}),
             ("+TCPL", {"cbva_weight": 0.0, "token_merge": False, "cbva_adaptive": False}),
             ("+CBVA", {"token_merge": False, "cbva_adaptive": False}),
             ("+token merging", {"cbva_adaptive": False}),
             ("+adaptive CBVA", {}))
# MSC's remedies as ProtoPRVR switches, each alone and all together, at MSC's weights
REMEDIES = {"TCPL": {"model.losses.tcpl_distance": 15.0, "model.losses.tcpl_angle": 30.0},
            "CBVA": {"model.losses.cbva": 0.1},
            "merged clips": {"model.clip_tokens": "merged"}}
DEFAULT_STORAGE = "float16"
SOURCE_KEYS = ("layout", "collection", "feature", "train_subset", "train_subset_seed")


@dataclass
class Variant:
    """One trained configuration and the table rows it fills."""

    name: str
    config: dict
    rows: list[tuple[str, str]] = field(default_factory=list)   # (table, label)


def full_config(config: dict) -> dict:
    """The config as `prvr train` records it (every section complete, today's key names)."""
    return canonical(config)


def plan_variants(presets: list[str], ablation_preset: str, prototype_counts: list[int], tables: list[str],
                  budget: dict, msc_preset: str = "msc_anet") -> list[Variant]:
    """The distinct configs to train, in order, each with the rows it fills."""
    wanted: list[tuple[str, dict, str, str]] = []   # (name, config, table, label)
    if "msc" in tables:
        msc = load_config(msc_preset)
        if msc["method"] != "msc":
            raise UsageError(f"--msc-preset {msc_preset!r} is a {msc['method']} preset; the msc table needs an msc one")
        for i, (label, switches) in enumerate(MSC_STEPS):
            cfg = override(msc, {**budget, **{f"model.{k}": v for k, v in switches.items()}})
            name = msc["preset"] if not switches else f"{msc['preset']}-{i}"
            if i == 0:          # the base is GMMFormer-v2 itself: its preset for the same data, when there is one
                twin = msc["preset"].replace("msc", "gmmformer2", 1)
                if twin in list_presets():
                    cfg, name = override(load_config(twin), budget), twin
            wanted.append((name, cfg, "msc", label))
    if "methods" in tables:
        configs = [load_config(preset) for preset in presets]
        methods = [cfg["method"] for cfg in configs]
        for cfg in configs:   # a row is named by its method, or by its preset when two rows share a method
            label = cfg["method"] if methods.count(cfg["method"]) == 1 else cfg["preset"]
            wanted.append((cfg["preset"], override(cfg, budget), "methods", label))
    base = load_config(ablation_preset)
    if base["method"] != "protoprvr" and {"ablation", "prototypes", "remedies"} & set(tables):
        raise UsageError(f"--ablation-preset {ablation_preset!r} is a {base['method']} preset; "
                         "the ablation and prototype tables need a protoprvr preset")
    if "ablation" in tables:
        for n_on in range(len(AUX_LOSSES) + 1):
            off = AUX_LOSSES[n_on:]
            label = "+".join(("retrieval",) + AUX_LOSSES[:n_on])
            cfg = override(base, {**budget, **{f"model.losses.{loss}": 0 for loss in off}})
            wanted.append((f"{base['preset']}-" + "-".join(["no"] + list(off)) if off else base["preset"],
                           cfg, "ablation", label))
    if "remedies" in tables:
        wanted.append((base["preset"], override(base, budget), "remedies", "ProtoPRVR"))
        for label, sets in list(REMEDIES.items()) + [("all three", {k: v for d in REMEDIES.values()
                                                                  for k, v in d.items()})]:
            slug = label.replace(" ", "-").lower()
            wanted.append((f"{base['preset']}-{slug}", override(base, {**budget, **sets}), "remedies", f"+{label}"))
    if "prototypes" in tables:
        default_lp = base["model"].get("n_prototypes", 30)
        for lp in prototype_counts:
            cfg = override(base, {**budget, "model.n_prototypes": lp}) if lp != default_lp else override(base, budget)
            wanted.append((f"{base['preset']}-p{lp}" if lp != default_lp else base["preset"], cfg, "prototypes", str(lp)))

    variants: dict[str, Variant] = {}
    for name, cfg, table, label in wanted:
        key = json.dumps(full_config(cfg), sort_keys=True)
        if key not in variants:
            variants[key] = Variant(name, full_config(cfg))
        variants[key].rows.append((table, label))
    names = [v.name for v in variants.values()]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise UsageError(f"two different configs would share the run folder {clash!r}; give distinct presets")
    return list(variants.values())


def _comparable(config: dict) -> dict:
    """A config in today's names, without the keys that only decide when to stop (they may differ in a resumed run)."""
    cfg = json.loads(json.dumps(canonical(config)))
    for key in STOP_KEYS:
        cfg.get("train", {}).pop(key, None)
    return cfg


def say(console, text: str) -> None:
    """A progress line on stderr (plain text: run names are not rich markup)."""
    console.print(f"[bench] {text}", markup=False)


def train_or_reuse(variant: Variant, data, runs: Path, device: str, seed: int, console) -> dict:
    """metrics.json of the variant's run: reused when finished and identical, else trained or resumed."""
    out = runs / variant.name
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        try:
            done = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{metrics_path} is unreadable ({e}); move the folder away or use another --runs") from e
        same_data = all(done.get("data", {}).get(k) == data.source.get(k) for k in SOURCE_KEYS)
        if _comparable(done["config"]) != _comparable(variant.config) or done.get("seed") != seed \
                or not same_data:
            raise UsageError(f"{out} holds a run with other settings (config, seed or data); "
                             "use another --runs folder or move that run away")
        same_stop = all(done["config"]["train"].get(k) == variant.config["train"][k] for k in STOP_KEYS)
        if done.get("status") == "done" and same_stop:
            say(console, f"{variant.name}: reusing the finished run in {out}")
            return {**done, "reused": True}
    resume = (out / "last.pt").is_file()
    say(console, f"{variant.name}: {'resuming' if resume else 'training'} in {out}")
    return {**train(variant.config, data, out, device=device, seed=seed, resume=resume, console=console),
            "reused": False}


def measure(variant: Variant, summary: dict, data, device: str) -> dict:
    """Test-split accuracy per storage type, stored vectors, bytes and matching FLOPs per video."""
    model, meta = load_checkpoint(summary["checkpoints"]["best"], map_location=device)
    kinds = storage_metrics(model, data.splits["test"], device)
    main = kinds[DEFAULT_STORAGE]
    dim = model.output_dim
    return {
        "name": variant.name, "method": meta["method"], "rows": [list(r) for r in variant.rows],
        "config": variant.config, "metrics": main["metrics"], "storage": kinds,
        "vectors_per_video": main["vectors_per_video"], "bytes_per_video": main["bytes_per_video"],
        "flops_per_query_per_video": round(matching_flops(meta["method"], main["clip_vectors_per_video"],
                                                          main["frame_vectors_per_video"], dim)),
        "training": {"epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
                     "seconds_per_epoch": summary["seconds_per_epoch"], "reused": summary["reused"],
                     "val": summary["val"], "run_dir": summary["run_dir"]},
    }


def bench_accuracy(data, runs: Path, presets: list[str], ablation_preset: str, prototype_counts: list[int],
                   tables: list[str], budget: dict, device: str, seed: int, console, msc_preset: str = "msc_anet"
                   ) -> dict:
    """Train (or reuse) every variant, then measure each on the test split. Returns the full result."""
    if "test" not in data.splits:
        raise UsageError("the dataset has no test split; `prvr bench accuracy` reports test-split accuracy")
    variants = plan_variants(presets, ablation_preset, prototype_counts, tables, budget, msc_preset)
    say(console, f"{len(variants)} runs to train or reuse: {', '.join(v.name for v in variants)}")
    runs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = []
    for v in variants:
        summary = train_or_reuse(v, data, runs, device, seed, console)
        say(console, f"{v.name}: scoring the test split with each storage type")
        results.append(measure(v, summary, data, device))
    test = data.splits["test"]
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - started),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": device, "load_average": load_average()},
        "data": {**data.source, "test_videos": test.n_videos, "test_queries": test.n_queries,
                 **{f"{n}_videos": s.n_videos for n, s in data.splits.items()}},
        "budget": budget, "seed": seed, "storage_default": DEFAULT_STORAGE, "results": results,
    }


# ------------------------------------------------------------------------------------------ report

def _rows(result: dict, table: str) -> list[tuple[str, dict]]:
    """(label, result) of one table in reading order: losses in the order added, prototypes ascending."""
    rows = [(label, r) for r in result["results"] for t, label in r["rows"] if t == table]
    if table == "ablation":
        rows.sort(key=lambda row: row[0].count("+"))
    elif table == "prototypes":
        rows.sort(key=lambda row: int(row[0]))
    return rows


def _recalls(m: dict) -> list[str]:
    return [f"{m[k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@100", "SumR")]


def _md(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
           ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]


def markdown(result: dict) -> str:
    """The report as Markdown tables."""
    d, b = result["data"], result["budget"]
    budget = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in b.items()) or "the presets' own"
    lines = [f"Test split of {d.get('collection', '')} ({d['layout']}, feature {d.get('feature')}): "
             f"{d['test_videos']} videos, {d['test_queries']} queries; training videos {d['train_videos']}; "
             f"budget: {budget}; seed {result['seed']}; {result['date']}; {result['machine']['processor']} "
             f"({result['machine']['device']}). Accuracy as stored ({result['storage_default']}).", ""]
    recall_h = ["R@1", "R@5", "R@10", "R@100", "SumR"]
    methods = _rows(result, "methods")
    if methods:
        lines += ["### Methods", ""] + _md(
            ["method", *recall_h, "vectors/video", "bytes/video", "FLOPs/query/video", "best epoch", "s/epoch"],
            [[label, *_recalls(r["metrics"]), r["vectors_per_video"], f"{r['bytes_per_video']:,}",
              f"{r['flops_per_query_per_video']:,}", f"{r['training']['best_epoch']}/{r['training']['epochs']}",
              f"{r['training']['seconds_per_epoch']:.0f}"] for label, r in methods]) + [""]
        lines += ["### Storage types", ""] + _md(
            ["method", "storage", "bytes/video", "SumR", "top-1 same as float32", "top-10 overlap"],
            [[label, kind, f"{s['bytes_per_video']:,}", f"{s['metrics']['SumR']:.2f}", s["top1_agreement"],
              next(v for k, v in s.items() if k.startswith("recall@"))]
             for label, r in methods for kind, s in r["storage"].items()]) + [""]
    ablation = _rows(result, "ablation")
    if ablation:
        lines += ["### Ablation: auxiliary losses added in turn (ProtoPRVR)", ""] + _md(
            ["losses", *(f"L_{x}" for x in AUX_LOSSES), *recall_h],
            [[label, *("x" if r["config"]["model"]["losses"].get(x, 1) > 0 else "" for x in AUX_LOSSES),
              *_recalls(r["metrics"])] for label, r in ablation]) + [""]
    for table, title in (("msc", "MSC ablation: GMMFormer-v2 and each remedy added in turn"),
                         ("remedies", "MSC's remedies on ProtoPRVR")):
        rows = _rows(result, table)
        if rows:
            lines += [f"### {title}", ""] + _md(["model", *recall_h, "bytes/video"],
                                                 [[label, *_recalls(r["metrics"]), f"{r['bytes_per_video']:,}"]
                                                  for label, r in rows]) + [""]
    protos = _rows(result, "prototypes")
    if protos:
        lines += ["### Prototypes per branch (ProtoPRVR)", ""] + _md(
            ["prototypes", *recall_h, "bytes/video", "FLOPs/query/video"],
            [[label, *_recalls(r["metrics"]), f"{r['bytes_per_video']:,}", f"{r['flops_per_query_per_video']:,}"]
             for label, r in protos]) + [""]
    return "\n".join(lines)


def _merge_into(record: Path, result: dict) -> dict:
    """`result` with the rows of an earlier record of the same data, budget and seed that it did not re-run
    (a rerun with other --presets adds rows instead of replacing the record)."""
    try:
        old = json.loads(record.read_text())
    except (OSError, ValueError):
        return result
    if any(old.get(k) != result.get(k) for k in ("data", "budget", "seed")):
        return result
    names = {r["name"] for r in result["results"]}
    return {**result, "results": [r for r in old.get("results", []) if r["name"] not in names] + result["results"]}


def plot(result: dict, folder: Path) -> list[Path]:
    """PNGs: SumR against bytes per video (methods x storage types), SumR against prototypes per branch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    methods = _rows(result, "methods")
    if methods:
        fig, ax = plt.subplots(figsize=(6, 4))
        markers = dict(zip(quantize.KINDS, ("o", "s", "D", "^")))
        for label, r in methods:     # one colour per method, one marker per storage type
            xs = [s["bytes_per_video"] for s in r["storage"].values()]
            ys = [s["metrics"]["SumR"] for s in r["storage"].values()]
            line, = ax.plot(xs, ys, "-", alpha=0.5, label=label)
            for kind, x, y in zip(r["storage"], xs, ys):
                ax.plot(x, y, markers[kind], color=line.get_color())
        for kind, marker in markers.items():
            ax.plot([], [], marker, color="gray", label=kind)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per video as stored (log)")
        ax.set_ylabel("test SumR")
        ax.set_title("Accuracy against memory per video")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "sumr_vs_memory.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    protos = _rows(result, "prototypes")
    if protos:
        pts = sorted((int(label), r["metrics"]["SumR"]) for label, r in protos)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p for p, _ in pts], [s for _, s in pts], "o-")
        ax.set_xlabel("prototypes per branch")
        ax.set_ylabel("test SumR")
        ax.set_title("ProtoPRVR: accuracy against prototypes")
        fig.tight_layout()
        written.append(folder / "sumr_vs_prototypes.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def run(data_root: Path, collection: str, feature: str, runs: Path, presets: list[str], ablation_preset: str,
        prototype_counts: list[int], tables: list[str], epochs: int | None, batch_videos: int | None,
        train_videos: int | None, seed: int, device: str, plots: Path | None, console,
        msc_preset: str = "msc_anet") -> dict:
    """`prvr bench accuracy`: check the request, load the data, train or reuse every run, score it, and write
    the record (runs/bench_accuracy*.json) and the plots."""
    from ..devices import resolve_device
    from ..training.feature_layouts import load_features

    bad = [t for t in tables if t not in TABLES]
    if bad or not tables:
        raise UsageError(f"--tables {','.join(tables)!r}: choose from {', '.join(TABLES)}")
    if "methods" in tables and not presets:
        raise UsageError("--presets is empty; name at least one preset, e.g. protoprvr_anet")
    budget = {}
    for flag, key, value in (("--epochs", "train.max_epochs", epochs), ("--batch-videos", "train.batch_videos",
                                                                         batch_videos)):
        if value is not None:
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
            budget[key] = value
    if train_videos is not None and train_videos < 2:
        raise UsageError(f"--train-videos {train_videos}: use at least 2 videos (or leave it out for all)")
    device = resolve_device(device)
    say(console, f"loading {data_root} ({collection}/{feature})")
    dataset = load_features(data_root, collection, feature, seed=seed).with_train_subset(train_videos, seed)
    result = bench_accuracy(dataset, runs, presets, ablation_preset, prototype_counts, tables, budget, device, seed,
                            console, msc_preset)
    result["plots"] = [str(p) for p in plot(result, plots or runs)]
    # the full report keeps its own name, so a partial rerun (--tables) never replaces it
    record = runs / ("bench_accuracy.json" if set(tables) == set(DEFAULT_TABLES) else f"bench_accuracy-{'+'.join(tables)}.json")
    result = _merge_into(record, result)
    record.write_text(json.dumps(result, indent=2))
    say(console, f"results in {record}; plots: {', '.join(result['plots'])}")
    return result
