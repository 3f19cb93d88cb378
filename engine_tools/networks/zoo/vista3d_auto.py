"""VISTA3D (MONAI ``vista3d132``) reduced to its automatic all-class segmentation path.

``VISTA3D.forward`` takes optional point and class prompts, branches in Python on them and returns one
sigmoid-logit map per requested class, so it cannot be exported as it is. :class:`VISTA3DAuto` fixes the
class prompt to every supported class (a constant buffer), runs the image encoder's label branch and the
class head only, and returns ``N, 133, D, H, W`` logits: channel 0 is a constant 0 (the sigmoid 0.5
threshold, i.e. "no class above threshold" = background) and channel ``k`` is class ``k``. Argmax over
channels thus reproduces the bundle's automatic output. Super-classes and tumour classes that the bundle
leaves out of "everything" segmentation get a large negative offset so they never win the argmax.
Point-prompt editing is interactive and outside a static INT8 engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Classes the bundle excludes from automatic segmentation (super-classes and lesions).
VISTA3D_EXCLUDED_FROM_AUTO: tuple[int, ...] = (2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132)
_EXCLUDED_OFFSET = -1.0e4


class VISTA3DAuto(nn.Module):
    """Export-friendly automatic segmentation head over a :class:`monai.networks.nets.VISTA3D`."""

    def __init__(
        self, vista: nn.Module, num_classes: int = 132, excluded: Sequence[int] = VISTA3D_EXCLUDED_FROM_AUTO
    ):
        super().__init__()
        self.vista = vista
        self.register_buffer("class_vector", torch.arange(1, num_classes + 1).view(-1, 1), persistent=False)
        offset = torch.zeros(1, num_classes + 1, 1, 1, 1)
        for cls in excluded:
            if 1 <= cls <= num_classes:
                offset[0, cls] = _EXCLUDED_OFFSET
        self.register_buffer("class_offset", offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, features = self.vista.image_encoder(x, with_point=False, with_label=True)
        logits, _ = self.vista.class_head(features, self.class_vector)  # K, N, D, H, W
        logits = logits.transpose(0, 1)
        background = torch.zeros_like(logits[:, :1])
        return torch.cat((background, logits), dim=1) + self.class_offset

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Accept the bundle's ``model.pt`` (keys of ``VISTA3D``) as well as this wrapper's own keys."""
        if not any(k.startswith("vista.") for k in state_dict):
            return self.vista.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def vista3d_auto(
    in_channels: int = 1,
    encoder_embed_dim: int = 48,
    num_classes: int = 132,
    blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
) -> VISTA3DAuto:
    """Builder used by the ``vista3d`` card.

    The defaults are exactly ``monai.networks.nets.vista3d132`` (the published network); ``blocks_down``
    and ``encoder_embed_dim`` exist only to build a reduced-width copy for CI.
    """
    from monai.networks.nets import VISTA3D, SegResNetDS2
    from monai.networks.nets.vista3d import ClassMappingClassify, PointMappingSAM

    encoder = SegResNetDS2(
        in_channels=in_channels,
        blocks_down=tuple(blocks_down),
        norm="instance",
        out_channels=encoder_embed_dim,
        init_filters=encoder_embed_dim,
        dsdepth=1,
    )
    point_head = PointMappingSAM(feature_size=encoder_embed_dim, n_classes=512, last_supported=num_classes)
    class_head = ClassMappingClassify(n_classes=512, feature_size=encoder_embed_dim, use_mlp=True)
    return VISTA3DAuto(
        VISTA3D(image_encoder=encoder, class_head=class_head, point_head=point_head), num_classes
    )
