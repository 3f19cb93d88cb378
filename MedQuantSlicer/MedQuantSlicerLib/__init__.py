"""Library of the MedQuantSlicer module: everything except the thin Slicer classes in ``MedQuantSlicer.py``.

Nothing here imports Qt or ``slicer`` at import time, so the pieces can be tested without the Slicer
application: :mod:`.process` runs ``engine_tools`` worker processes, :mod:`.controller` holds the
Apply/Cancel state machine, :mod:`.mrml_io` moves volumes, segmentations and result tables between
MRML and files, :mod:`.panel` binds all of it to the widgets of ``Resources/UI/MedQuantSlicer.ui``.
"""
