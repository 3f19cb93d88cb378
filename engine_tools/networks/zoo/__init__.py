"""Networks of the MedPTQ seed zoo that no maintained package provides.

Each builder is a plain callable returning an ``nn.Module`` (input ``N, C, D, H, W`` → logits
``N, K, D, H, W``); model cards name them by dotted path (``network.builder``). SwinUNETR and SegResNet
come from MONAI directly and nnU-Net from ``dynamic-network-architectures``.
"""

from engine_tools.networks.zoo.checkpoints import CheckpointError, load_checkpoint, read_state_dict

#: Model-card ids of the eight networks of the MedPTQ study (arXiv 2501.17343), in the paper's order.
SEED_MODELS = (
    "unet-btcv",
    "transunet-btcv",
    "swinunetr-btcv",
    "segresnet-wholebody",
    "unest-wholebrain",
    "vista3d",
    "nnunet-totalseg",
    "stunet-totalseg",
)

__all__ = ["SEED_MODELS", "CheckpointError", "load_checkpoint", "read_state_dict"]
