"""Operator commands (`mirror ...`), one module each, on one runner (runner.py)."""
