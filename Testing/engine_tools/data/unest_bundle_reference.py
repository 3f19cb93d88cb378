"""Reference logits of the MONAI bundle's own UNesT, for ``test_published_weights.py``.

The ``wholeBrainSeg_Large_UNEST_segmentation`` bundle ships its network as bundle code
(``scripts/networks/unest_base_patch_4.py``), not as part of MONAI, so the test cannot import it. This
script builds that network from a downloaded copy of the bundle at the card's reduced size, fills it
with the deterministic weights of ``reference_weights.publisher_weights``, runs one input and stores
a strided sample of the logits in ``unest_bundle_reference.npz``. Run it once with the MONAI version
the bundle declares (1.4.0)::

    pip install --target /tmp/monai14 monai==1.4.0 --no-deps
    PYTHONPATH=/tmp/monai14:BUNDLE_DIR python Testing/engine_tools/data/unest_bundle_reference.py

where ``BUNDLE_DIR`` is the unpacked bundle folder (the one holding ``scripts/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reference_weights import publisher_weights, seeded_input

#: The card's reduced widths and depths (``network.reduced_kwargs``) at the bundle's 96^3 window.
KWARGS = {
    "in_channels": 1,
    "out_channels": 3,
    "img_size": (96, 96, 96),  # the bundle network fixes its transformer at 96^3 whatever img_size says
    "feature_size": 4,
    "patch_size": 4,
    "depths": (1, 1, 2),
    "embed_dim": (32, 64, 128),
    "num_heads": (2, 2, 4),
}
WINDOW = (96, 96, 96)
STRIDE = 4
OUTPUT = Path(__file__).with_suffix(".npz")


def main() -> None:
    import monai
    from scripts.networks.unest_base_patch_4 import UNesT  # the bundle's own network code

    module = UNesT(**KWARGS).eval()
    module.load_state_dict(publisher_weights(module), strict=True)
    with torch.no_grad():
        logits = module(seeded_input(WINDOW)).numpy()
    np.savez_compressed(
        OUTPUT,
        logits_strided=logits[:, :, ::STRIDE, ::STRIDE, ::STRIDE],
        class_means=logits.mean(axis=(0, 2, 3, 4)),
        monai_version=monai.__version__,
        state_dict_keys=np.array(sorted(module.state_dict())),
    )
    print(f"wrote {OUTPUT} {logits.shape}")


if __name__ == "__main__":
    main()
