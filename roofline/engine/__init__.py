"""The engine: requests, scheduling, paged KV cache, model execution and sampling."""
