"""`prvr bench`: search latency (`latency`), ingest throughput (`ingest`), storage types (`storage`, `quantize`)
and every method trained and tested side by side (`accuracy`), on shapes from the methods' own configs
(`common`)."""
