"""Benchmark of mirror against CNCF distribution in proxy mode: `python -m bench.run`."""
