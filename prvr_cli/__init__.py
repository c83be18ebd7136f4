"""prvr: search a local video library with natural language (Partially Relevant Video Retrieval).

Where a query goes, top to bottom:

    cli/        `prvr search "..."`: flags -> Library.search -> print the hits (cli.output)
    library.py  Library: one index with its encoder and model; ingest, search, reindex, list, info, compact
    pipeline/   the stages: discover -> decode -> encode -> prototypes (and ingest, which runs them)
    index/      store (LanceDB tables, index.json, the writer lock) -> matrices (search cache) -> search (scores,
                highlights)
    nets/       the models (ProtoPRVR, MS-SL, GMMFormer), their typed configs and the factory over models/
    training/   datasets, the training loop, evaluation          (prvr train)
    bench/      latency, ingest, storage, accuracy                (prvr bench)

Imports go one way: cli -> library / training / bench -> pipeline / index / nets -> errors, settings, devices.
"""

__version__ = "0.1.0"
