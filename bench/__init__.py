"""The benchmark of `stream` (``python -m bench --help``): see bench/run.py."""
