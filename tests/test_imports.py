"""Every module imports, and the package's lazy exports resolve to what the README shows."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import qadapter


def test_every_module_imports():
    """Each module under qadapter imports on its own (optional extras are installed for the tests)."""
    names = [m.name for m in pkgutil.walk_packages(qadapter.__path__, "qadapter.") if not m.name.endswith("__main__")]
    assert {"qadapter.objective", "qadapter.training", "qadapter.serve", "qadapter.eval.runner"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_public_api_names_are_the_documented_objects():
    """`from qadapter import train, generate, …` gives the functions and classes, not same-named modules."""
    from qadapter import DecodeConfig, QAdapterConfig, QAdapterModel, generate, load_base, read_records, split_by_prompt, train

    for obj in (generate, load_base, read_records, split_by_prompt, train):
        assert callable(obj) and not isinstance(obj, type(qadapter))
    assert all(isinstance(cls, type) for cls in (DecodeConfig, QAdapterConfig, QAdapterModel))


def test_help_does_not_import_torch():
    """`qadapter --help` stays instant: the CLI imports torch only inside commands."""
    code = "import sys, qadapter.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
