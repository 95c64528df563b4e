"""Import a repository script (``benchmarks/*.py``, ``launchers/*.py``) as a module.

The scripts are not a package, so tests load them by path: ``load_script(path, name)``.
The module is registered in ``sys.modules`` under ``name`` before it runs, as dataclasses
and pickling look a module up there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """The script at ``path``, executed as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
