"""The bench/ scripts, imported as modules for their --tiny smoke tests."""

import importlib.util
from pathlib import Path


def load_bench(name: str):
    """bench/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench
