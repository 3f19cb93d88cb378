"""Reference logits of MONAI 1.4's SwinUNETR, for ``test_published_weights.py``.

The MONAI model-zoo SwinUNETR bundle was trained under MONAI <= 1.4, whose ``PatchMerging`` slice
order MONAI 1.5 changed. This script builds MONAI 1.4's own SwinUNETR at a small size, fills it with
the deterministic weights of :func:`publisher_weights` (numpy generator per parameter name, so any
MONAI version fills the same values), runs one input and stores the logits in
``swinunetr_monai14_reference.npz``. Run it once with MONAI 1.4.0 on the path::

    pip install --target /tmp/monai14 monai==1.4.0 --no-deps
    PYTHONPATH=/tmp/monai14 python Testing/engine_tools/data/swinunetr_monai14_reference.py

The test imports :data:`KWARGS`, :data:`WINDOW`, :func:`publisher_weights` and :func:`reference_input`
from this file (the weights come from ``reference_weights.py``), so both sides use the same weights
and input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reference_weights import publisher_weights, seeded_input

KWARGS = {
    "in_channels": 1,
    "out_channels": 2,
    "feature_size": 12,
    "depths": (1, 1, 1, 1),
    "num_heads": (3, 3, 3, 3),
}
WINDOW = (64, 64, 64)  # the smallest window whose bottleneck InstanceNorm sees more than one voxel
STRIDE = 4  # the reference keeps every 4th voxel of the logits (and their per-class means) to stay small
OUTPUT = Path(__file__).with_suffix(".npz")


def reference_input() -> torch.Tensor:
    return seeded_input(WINDOW)


def main() -> None:
    import monai
    from monai.networks.nets import SwinUNETR

    if monai.__version__ != "1.4.0":
        raise SystemExit(f"run this with MONAI 1.4.0 (found {monai.__version__})")
    module = SwinUNETR(img_size=WINDOW, **KWARGS).eval()
    module.load_state_dict(publisher_weights(module), strict=True)
    with torch.no_grad():
        logits = module(reference_input()).numpy()
    np.savez_compressed(
        OUTPUT,
        logits_strided=logits[:, :, ::STRIDE, ::STRIDE, ::STRIDE],
        class_means=logits.mean(axis=(0, 2, 3, 4)),
        monai_version=monai.__version__,
    )
    print(f"wrote {OUTPUT} {logits.shape}")


if __name__ == "__main__":
    main()
