"""spanqa: span-extraction question answering trained data-parallel with DeepSpeed."""

__version__ = "0.1.0"
