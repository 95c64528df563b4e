"""Shared pytest set-up: the markers that are off by default (``slow``, ``gpu``).

Helpers that live in tests/ are imported as top-level modules, one style everywhere::

    from distributed import run_distributed

pytest's default ``prepend`` import mode puts tests/ itself on ``sys.path`` (it has no
``__init__.py``), so this works under ``pytest`` and ``python -m pytest`` from any working
directory, with no PYTHONPATH. It is also how the ranks that ``run_distributed`` spawns
find a test module's worker functions (pickled as ``test_ddp._worker`` and so on):
spawned processes inherit the parent's ``sys.path``. ``tests.distributed`` would need the
repository root on ``sys.path`` as well, and would load the helper a second time under
another name.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
