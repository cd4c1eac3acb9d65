"""Import timm without the ``import wandb`` it runs on import.

``timm/utils/summary.py`` runs ``try: import wandb`` when timm is imported, for one function of timm's own training
script (``update_summary(..., log_wandb=True)``). W&B and its dependencies (pydantic, protobuf, ...) are about a
tenth of ``import cimq_pl`` and of ``python -m cimq_pl ... --help``; a run imports W&B anyway when Lightning's
``WandbLogger`` starts it. `import_timm` imports timm with ``wandb`` hidden, then hands ``timm.utils.summary`` a
stand-in that imports ``wandb`` on first use, so timm behaves as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["import_timm"]


class _ImportOnFirstUse(types.ModuleType):
    """Stands in for the module of the same name: the first attribute read imports it."""

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


def import_timm() -> None:
    """Import timm, without importing ``wandb`` when neither is imported yet and ``wandb`` is installed."""
    if "timm" in sys.modules or "wandb" in sys.modules or importlib.util.find_spec("wandb") is None:
        import timm  # noqa: F401

        return
    sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm catches
    try:
        import timm.utils.summary
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]
    timm.utils.summary.wandb = _ImportOnFirstUse("wandb")
