"""Which Slicer the module supports, and forgetting the library on reload.

Imported by ``MedQuantSlicer.py`` before anything else of the library, so it must import on the
Python of older Slicer releases too (3.9 in Slicer 5.8): no ``X | Y`` evaluated at runtime, no
``match``. The rest of the library targets Python 3.12 (Slicer 5.10+).
"""

import sys

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)
LIBRARY = "MedQuantSlicerLib"


def unsupported_reason(slicer_version, python_version=None):
    """A sentence for the user when this Slicer is too old, else ``None``.

    ``slicer_version`` is ``(major, minor)`` of the application (``None`` outside it).
    """
    python_version = tuple(python_version or sys.version_info[:2])[:2]
    wanted = "MedQuantSlicer needs 3D Slicer {}.{} or newer (Python {}.{}+)".format(
        *(MINIMUM_SLICER + MINIMUM_PYTHON)
    )
    if slicer_version is not None and tuple(slicer_version)[:2] < MINIMUM_SLICER:
        found = "{}.{}".format(*tuple(slicer_version)[:2])
        return wanted + "; this is Slicer {} with Python {}.{}. Install a current Slicer.".format(
            found, *python_version
        )
    if python_version < MINIMUM_PYTHON:
        return wanted + "; this Python is {}.{}. Install a current Slicer.".format(*python_version)
    return None


def forget_library(modules=None):
    """Drop ``MedQuantSlicerLib`` and its submodules from ``sys.modules`` (names removed).

    Slicer's "Reload" re-executes only ``MedQuantSlicer.py``; without this, the old library modules
    (and the classes the new widget would build on) stay cached, as SlicerNNUnet notes in its
    ``onReload``.
    """
    modules = sys.modules if modules is None else modules
    names = [
        name
        for name in list(modules)
        if name == LIBRARY or name.startswith(LIBRARY + ".") or name.startswith("_medquant_light_")
    ]
    for name in names:
        del modules[name]
    return names
