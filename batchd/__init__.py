"""batchd: a windowed batching daemon for offline LLM work."""

__version__ = "0.1.0"
