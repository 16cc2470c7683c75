"""Where the timm-tower tests run: a side folder holding timm and a torchvision
(scripts/install_timm_site.sh, run by ``make setup-dev``) that only those tests put on their path.

Why a side folder: with torchvision importable, transformers prefers its torchvision image
processors to the PIL ones, which every other test and the quickstart's numbers use.

Why :func:`allow_torchvision_without_ops`: PyPI's torchvision 0.28.0 for Linux is CUDA-built, so
beside this machine's CPU torch its compiled ops do not load. torchvision expects that (each of its
op registrations checks ``extension._has_ops()``) except in one place: its fake kernel for
``torchvision::nms`` is registered unguarded and raises "operator torchvision::nms does not
exist", so ``import torchvision`` fails. The function skips fake-kernel registrations of
torchvision ops that do not exist while torchvision imports, as torchvision does for the others.
timm's models use none of those ops (and the tests' image processors are PIL ones).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("VLMALIGN_TIMM_SITE", REPO / ".venv" / "timm-site"))
INNER = "VLMALIGN_TIMM_INNER"   # set in the side environment's pytest process


def _op_exists(qualname: str) -> bool:
    import torch
    namespace, _, name = qualname.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def allow_torchvision_without_ops() -> None:
    """Import torchvision, skipping fake kernels of its ops that did not load (see the module)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch.library as library
    real = library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::") and not _op_exists(op):
            return args[0] if args and callable(args[0]) else (lambda fn: fn)
        return real(op, *args, **kwargs)

    library.register_fake = register_fake
    try:
        import torchvision  # noqa: F401
    finally:
        library.register_fake = real
