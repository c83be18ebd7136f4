"""prvr: search a local video library with natural language (Partially Relevant Video Retrieval)."""

__version__ = "0.1.0"
