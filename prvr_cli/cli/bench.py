"""`prvr bench`: search latency, ingest throughput, storage types and accuracy, measured on this machine.

Results go to stdout (a table, or JSON with --json); progress goes to stderr.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .. import settings
from ..errors import UsageError
from .options import CollectionOpt, DataOpt, FeatureOpt, PresetOpt, SetOpt, TrainDeviceOpt
from .output import native_stderr_silenced, stderr, write_line

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        rich_markup_mode=None, help="Efficiency and accuracy benchmarks: search latency, ingest "
                                                    "throughput, storage types, methods side by side (numbers are "
                                                    "measured on this machine).")


def _say(text: str) -> None:
    stderr.print(f"[bench] {text}", markup=False, highlight=False)


def _int_list(value: str, flag: str) -> list[int]:
    try:
        out = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {value!r}: give comma-separated whole numbers, e.g. 1000,10000,100000") from None
    if not out or any(v < 1 for v in out):
        raise UsageError(f"{flag} {value!r}: give comma-separated numbers of at least 1, e.g. 1000,10000")
    return out


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    write_line("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        write_line("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


@bench_app.command("search")
def search_cmd(
    sizes: str = typer.Option("1000,10000,100000", "--sizes", help="Corpus sizes (videos), comma-separated."),
    queries: int = typer.Option(32, "--queries", help="Queries in the batched measurement."),
    repeats: int = typer.Option(7, "--repeats", help="Timed runs per cell (median reported)."),
    methods: str = typer.Option("protoprvr,mssl,gmmformer", "--methods", help="Methods, comma-separated."),
    lancedb: bool = typer.Option(True, "--lancedb/--no-lancedb", help="Also time LanceDB's flat multivector search."),
    lancedb_max: Optional[int] = typer.Option(None, "--lancedb-max", help="Largest corpus to write into LanceDB."),
    mssl_frames: int = typer.Option(64, "--mssl-frames", help="Frame tokens per video for MS-SL (model max 128)."),
    mem_gib: float = typer.Option(6.0, "--mem-gib", help="Memory for synthetic vectors; larger corpora are streamed."),
    cell_budget: float = typer.Option(60.0, "--cell-budget", help="Seconds per cell; long cells get fewer runs."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a log-log PNG of latency vs corpus size."),
    seed: int = typer.Option(0, "--seed"),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Instead: time whole `prvr search` processes "
                                    "(wall, peak memory) on synthetic indexes of each size."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="With --end-to-end: the indexes' encoder."),
    clip_pretrained: str = typer.Option("none", "--clip-pretrained", help="With --end-to-end: its weights "
                                        "(none: random, same speed)."),
    folder: Optional[Path] = typer.Option(None, "--folder", help="With --end-to-end or --ann: where the synthetic "
                                          "libraries are kept and reused [default: the user cache folder]."),
    ann: bool = typer.Option(False, "--ann", help="Instead: approximate candidates against exact search (recall@10, "
                             "p50/p99, peak memory, build time) on libraries of a trained model's prototypes."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="With --ann: the trained ProtoPRVR "
                                              "checkpoint whose prototypes the libraries are made of. With "
                                              "--end-to-end: a checkpoint of --clip-model whose query branch and "
                                              "prototype dimension the indexes take (default: zero-shot)."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --ann: the benchmark the checkpoint encodes."),
    collection: str = typer.Option("anet", "--collection", help="With --ann: the collection under --data."),
    feature: str = typer.Option("cg", "--feature", help="With --ann: the video feature name."),
    probes: str = typer.Option("16,32,64", "--probes", help="With --ann: centroids probed per branch."),
    depths: str = typer.Option("128,256", "--depths", help="With --ann: candidates scored exactly per query."),
    cold: bool = typer.Option(False, "--cold", help="With --ann: also time the candidates with the prototype files "
                              "evicted from the file cache before each query (a library larger than memory)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
):
    """Query latency against corpus size for each method's exact scoring (synthetic stored vectors)."""
    from ..bench.latency import bench_search, plot_search

    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: give a .png file name")
    if ann:
        _bench_ann(_int_list(sizes, "--sizes"), checkpoint, data, collection, feature, _int_list(probes, "--probes"),
                   _int_list(depths, "--depths"), folder or settings.cache_home() / "bench-ann", queries, seed, as_json,
                   cold)
        return
    if end_to_end:
        from ..bench.end_to_end import bench_end_to_end

        if checkpoint is not None and not checkpoint.is_file():
            raise UsageError(f"--checkpoint {checkpoint}: no such file; give a `prvr train` best.pt")
        result = bench_end_to_end(_int_list(sizes, "--sizes"), clip_model, clip_pretrained,
                                  folder or settings.cache_home() / "bench-indexes", repeats, checkpoint=checkpoint,
                                  progress=_say)
        if as_json:
            write_line(json.dumps(result))
        else:
            _table(["videos", "cold s", "cold peak MiB", "served s", "served peak MiB", "server p50/p99 ms",
                    "errors", "scan / read ms", "cache MiB", "load 1/5/15m"],
                   [[c["n_videos"], c["median_wall_s"], c["peak_rss_mib"], c.get("served_median_wall_s", "-"),
                     c.get("served_peak_rss_mib", "-"),
                     f"{c['load']['p50_ms']}/{c['load']['p99_ms']} ({c['load']['clients']} clients)" if "load" in c
                     else "-", c["load"]["errors"] if "load" in c else "-",
                     f"{c['scan']['scan_ms']} / {c['scan']['read_ms']} (x{c['scan']['ratio']})", c["cache_mib"],
                     "/".join(f"{x:.1f}" for x in c["load_average"])] for c in result["cells"]])
        return
    result = bench_search(_int_list(sizes, "--sizes"), _names(methods), queries, repeats, lancedb, mssl_frames,
                          mem_gib, cell_budget, lancedb_max, seed, progress=_say)
    if plot is not None:
        result["plot"] = str(plot_search(result, plot))
        _say(f"plot written to {plot}")
    write_line(json.dumps(result)) if as_json else _print_search(result)


def _bench_ann(sizes, checkpoint, data, collection, feature, probes, depths, folder, queries, seed, as_json,
               cold) -> None:
    from ..bench.ann import bench_ann
    from ..training.feature_layouts import load_features

    if checkpoint is None or not checkpoint.is_file():
        raise UsageError(f"--ann needs --checkpoint, a trained ProtoPRVR checkpoint (got {checkpoint})")

    def benchmark():
        if data is None:
            raise UsageError("--ann needs --data (and --collection) the first time, to encode the benchmark's videos")
        _say(f"loading {data} ({collection}/{feature})")
        return load_features(data, collection, feature)

    result = bench_ann(sizes, checkpoint, benchmark, folder, queries, probes, depths, seed, progress=_say, cold=cold)
    if as_json:
        write_line(json.dumps(result))
        return
    rows = []
    for c in result["cells"]:
        rows.append([c["n_videos"], "exact", "-", "-", "1", c["exact"]["p50_ms"], c["exact"]["p99_ms"],
                     c["exact"]["peak_rss_mib"], "-", c["cache_mib"]])
        for a in c["ann"]:
            rows.append([c["n_videos"], "candidates", a["probe"], a["depth"], a["recall_at_10"], a["p50_ms"],
                         a["p99_ms"], a["peak_rss_mib"], c["build_s"], c["ann_mib"]])
            if "cold" in a:
                rows.append([c["n_videos"], "candidates, cold", a["probe"], a["depth"], a["recall_at_10"],
                             a["cold"]["p50_ms"], a["cold"]["p99_ms"], a["cold"]["peak_rss_mib"], "-", "-"])
    _table(["videos", "search", "probe", "depth", "recall@10", "p50 ms", "p99 ms", "peak MiB", "build s",
            "MiB on disk"], rows)
    write_line(f"{result['queries']} queries; load average {result['load_average']}")


def _print_search(result: dict) -> None:
    rows = [[c["method"], c["engine"], c["n_videos"], c["queries"], f"{c['median_ms']:.1f}", f"{c['per_query_ms']:.2f}",
             c["runs"], "/".join(f"{x:.1f}" for x in c["load_average"]), "streamed" if c["streamed"] else ""]
            for c in result["cells"]]
    _table(["method", "engine", "videos", "queries", "median ms", "ms/query", "runs", "load 1/5/15m", ""], rows)
    write_line()
    for r in result["ratios"]:
        write_line(f"{r['what']:<36} {r['n_videos']:>8} videos  {r['queries']:>3} queries  x{r['ratio']}")
    for m, b in result["bytes_per_video"].items():
        write_line(f"{m:<10} {b['model_vectors']} vectors = {b['model_bytes_fp16']} B/video fp16 "
                   f"(as scored: {b['scored_vectors']} vectors = {b['scored_bytes_fp16']} B)")
    write_line(f"load average {result['load_average']}")


@bench_app.command("ingest")
def ingest_cmd(
    path: Path = typer.Argument(..., metavar="PATH", help="A folder (or file) of videos."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name or config .json."),
    clip_pretrained: str = typer.Option("none", "--clip-pretrained",
                                        help="none (random weights: same speed as trained ones), a tag, or a file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    fps: float = typer.Option(3.0, "--fps", help="Frames sampled per second."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads [default min(4, cores)]."),
    batch_size: int = typer.Option(64, "--batch-size", help="Frames per encoder batch."),
    profile: bool = typer.Option(False, "--profile", help="cProfile the full ingest (top functions in the output)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
):
    """Frames/s of decoding alone, the CLIP image encoder alone, and the full ingest, in one run."""
    from ..bench.ingest import bench_ingest
    from ..devices import resolve_device

    with native_stderr_silenced():
        res = bench_ingest(path, clip_model, clip_pretrained, resolve_device(device), fps,
                           workers if workers is not None else min(4, os.cpu_count() or 1), batch_size, profile,
                           progress=_say)
    if as_json:
        write_line(json.dumps(res))
        return
    s = res["settings"]
    write_line(f"{res['files']} files, {res['frames']} frames at {s['fps']} fps; CLIP {s['clip_model']}/"
               f"{s['clip_pretrained']} on {s['device']}, {s['workers']} workers, batch {s['batch_size']}")
    _table(["stage", "frames", "seconds", "frames/s"],
           [[k, res[k]["frames"], res[k]["seconds"], res[k]["frames_per_s"]] for k in ("decode", "encoder", "full_ingest")])
    write_line(f"time per frame, full ingest / encoder alone: {res['ratio_full_over_encoder_time']}")
    write_line(f"load average {res['load_average']}")
    if res.get("profile"):
        write_line(res["profile"])


@bench_app.command("storage")
def storage_cmd(
    n_videos: int = typer.Option(10000, "--videos", help="Synthetic videos for the score-effect measurement."),
    n_queries: int = typer.Option(256, "--queries", help="Synthetic queries."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint from `prvr train`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset root (with --checkpoint)."),
    collection: str = typer.Option("anet", "--collection"),
    feature: str = typer.Option("cg", "--feature"),
    split: str = typer.Option("test", "--split", help="Split to evaluate on."),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
):
    """Bytes per video and score/rank effect of float32, float16 and int8 storage (synthetic and, optionally, real)."""
    from ..bench.common import load_average
    from ..bench.storage import bench_storage_real, bench_storage_synthetic
    from ..devices import resolve_device

    if (checkpoint is None) != (data is None):
        raise UsageError("--checkpoint and --data go together; pass both (or neither for synthetic only)")
    _say(f"synthetic ProtoPRVR prototypes: {n_videos} videos, {n_queries} queries")
    res = {"synthetic": bench_storage_synthetic(n_videos, n_queries)}
    if checkpoint is not None:
        res["real"] = bench_storage_real(str(checkpoint), str(data), collection, feature, split,
                                         resolve_device(device), progress=_say)
    res["load_average"] = load_average()
    write_line(json.dumps(res)) if as_json else _print_storage(res)


def _print_storage(res: dict) -> None:
    syn = res["synthetic"]
    write_line("bytes per video (model outputs; MS-SL with "
               f"{syn['mssl_frames']} frame tokens; int8 includes a 4-byte scale per vector)")
    kinds = list(next(iter(syn["bytes_per_video"].values())))
    _table(["method"] + kinds, [[m] + [b[k] for k in kinds] for m, b in syn["bytes_per_video"].items()])
    write_line()
    eff = syn["synthetic_protoprvr"]["effect"]
    write_line(f"synthetic ProtoPRVR prototypes ({syn['synthetic_protoprvr']['n_videos']} videos), vs float32:")
    _table(["storage", "bytes/video", "max |score err|", "recall@10 overlap", "top-1 agree", "1-query ms"],
           [[k, e["bytes_per_video"], f"{e['max_abs_score_error']:.2e}", e["recall@10_overlap"], e["top1_agreement"],
             e["one_query_ms"]] for k, e in eff.items()])
    if "real" in res:
        r = res["real"]
        write_line()
        write_line(f"real {r['method']} outputs on {r['split']} ({r['n_videos']} videos, {r['n_queries']} queries):")
        _table(["storage", "bytes/video", "max |score err|", "recall@10 overlap", "top-1 agree", "SumR"],
               [[k, e["bytes_per_video"], f"{e['max_abs_score_error']:.2e}", e["recall@10_overlap"],
                 e["top1_agreement"], f"{e['metrics']['SumR']:.2f}"] for k, e in r["kinds"].items()])
    write_line(f"load average {res['load_average']}")


@bench_app.command("accuracy")
def accuracy_cmd(
    data: Path = DataOpt,
    collection: str = CollectionOpt,
    feature: str = FeatureOpt,
    runs: Path = typer.Option(..., "--runs", help="Folder of run folders: finished runs are reused, others resumed."),
    presets: str = typer.Option("protoprvr_anet,mssl_anet,gmmformer_anet", "--presets",
                                help="Presets of the methods table, comma-separated."),
    ablation_preset: str = typer.Option("protoprvr_anet", "--ablation-preset",
                                        help="ProtoPRVR preset for the ablation and prototype tables."),
    prototypes: str = typer.Option("10,20,30,60", "--prototypes", help="Prototype counts per branch to compare."),
    tables: str = typer.Option("methods,ablation,prototypes", "--tables", help="Which tables, comma-separated: "
                               "methods, ablation, prototypes; msc (MSC's ablation) and remedies (MSC's remedies "
                               "on ProtoPRVR) on request."),
    msc_preset: str = typer.Option("msc_anet", "--msc-preset", help="MSC preset for the msc table."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs for every run [default: the presets']."),
    batch_videos: Optional[int] = typer.Option(None, "--batch-videos", help="Videos per step for every run."),
    train_videos: Optional[int] = typer.Option(None, "--train-videos",
                                               help="Train on a seeded subset of this many training videos."),
    seed: int = typer.Option(0, "--seed", help="Seed of every run (and of the training subset)."),
    device: str = TrainDeviceOpt,
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for the PNG plots [default: --runs]."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout instead of Markdown."),
):
    """Train (or reuse) ProtoPRVR, MS-SL, GMMFormer and the ProtoPRVR ablations; test R@K, SumR, memory, FLOPs."""
    from rich.console import Console

    from ..bench import accuracy

    result = accuracy.run(data, collection, feature, runs, _names(presets), ablation_preset,
                          _int_list(prototypes, "--prototypes"), _names(tables), epochs, batch_videos, train_videos,
                          seed, device, plots, Console(stderr=True, soft_wrap=True, highlight=False), msc_preset)
    write_line(json.dumps(result) if as_json else accuracy.markdown(result))


@bench_app.command("seeds")
def seeds_cmd(
    records: list[str] = typer.Argument(..., metavar="RECORD...", help="`prvr bench accuracy --json` outputs "
                                        "and/or `prvr train` run folders (LABEL=FOLDER names the row), one per seed."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout instead of Markdown."),
):
    """The seed spread of runs made with different seeds: per model, the mean and min-max of test R@K and SumR."""
    from ..bench.seeds import aggregate, markdown

    entries = aggregate(records)
    write_line(json.dumps(entries) if as_json else markdown(entries))


@bench_app.command("rerank")
def rerank_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint with a text-proxy head "
                                    "(`prvr train --proxy-head`)."),
    data: Path = DataOpt,
    collection: str = CollectionOpt,
    feature: str = FeatureOpt,
    depths: str = typer.Option("50,100", "--k", help="Re-ranking depths K to measure, comma-separated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the val hold-out (as in training)."),
    device: str = TrainDeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
):
    """Test R@K and SumR with and without text-proxy re-ranking of the top K, and the added time per query."""
    from ..bench.rerank import bench_rerank
    from ..devices import resolve_device
    from ..training.feature_layouts import load_features

    ks = _int_list(depths, "--k")
    _say(f"loading {data} ({collection}/{feature})")
    res = bench_rerank(checkpoint, load_features(data, collection, feature, seed=seed), ks, resolve_device(device))
    if as_json:
        write_line(json.dumps(res))
        return
    write_line(f"{res['method']} with its text-proxy head (gamma {res['gamma']}, chosen on val); test: "
               f"{res['queries']} queries, {res['videos']} videos; {res['device']}, {res['torch_threads']} threads")
    _table(["re-ranked", "R@1", "R@5", "R@10", "R@100", "SumR", "added ms/query"],
           [["none" if r["k"] == 0 else f"top {r['k']}", *(f"{r[m]:.2f}" for m in ("R@1", "R@5", "R@10", "R@100",
                                                                                   "SumR")), r["ms_per_query"]]
            for r in res["rows"]])
    write_line(f"load average {res['load_average']}")


@bench_app.command("train")
def train_cmd(
    data: Path = DataOpt,
    collection: str = CollectionOpt,
    feature: str = FeatureOpt,
    preset: str = PresetOpt,
    batch_videos: Optional[int] = typer.Option(None, "--batch-videos", help="Videos per step [default: the preset's]."),
    sets: list[str] = SetOpt,
    steps: int = typer.Option(20, "--steps", help="Timed steps (median reported)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first."),
    seed: int = typer.Option(0, "--seed"),
    device: str = TrainDeviceOpt,
    profile: bool = typer.Option(False, "--profile", help="Also list torch operators by their own CPU time."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
):
    """Milliseconds per training step (forward, backward, update) and per batch preparation, for one config."""
    from ..bench.train_step import bench_train_step
    from ..devices import resolve_device
    from ..nets.factory import canonical, load_config, override
    from ..training.feature_layouts import load_features
    from .train import parse_sets

    overrides = {**parse_sets(sets), **({"train.batch_videos": batch_videos} if batch_videos else {})}
    config = canonical(override(load_config(preset), overrides))
    _say(f"loading {data} ({collection}/{feature})")
    dataset = load_features(data, collection, feature, seed=seed)
    res = bench_train_step(dataset, config, resolve_device(device), steps, warmup, seed, profile)
    if as_json:
        write_line(json.dumps(res))
        return
    write_line(f"{res['method']} ({res['preset']}) on {res['device']}, {res['batch_videos']} videos per step, "
               f"{res['torch_threads']} threads: step {res['step_ms']} ms (min-max {res['step_ms_min_max']}), "
               f"batch preparation {res['prepare_ms']} ms; median of {res['steps']} steps")
    write_line(f"load average {res['load_average']}")
    if res["profile"]:
        write_line(res["profile"])
