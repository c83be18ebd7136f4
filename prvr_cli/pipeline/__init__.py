"""The ingest stages, in order: discover (files) -> decode (frames) -> encode (CLIP features) -> prototypes.

`ingest` runs them over many files at once and hands each finished video to the index.
"""
