"""Compression jobs: the durable queue, the runner that supervises worker processes, and the worker."""
