"""pagedecode: a paged-KV-cache LLM inference engine."""
__version__ = "0.1.0"
