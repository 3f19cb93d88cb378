"""Networks of the MedPTQ seed zoo that no maintained package provides.

Each builder is a plain callable returning an ``nn.Module`` (input ``N, C, D, H, W`` → logits
``N, K, D, H, W``); model cards name them by dotted path (``network.builder``). SwinUNETR and SegResNet
come from MONAI directly and nnU-Net from ``dynamic-network-architectures``.
"""

from engine_tools.networks.zoo.checkpoints import CheckpointError, load_checkpoint, read_state_dict

__all__ = ["CheckpointError", "load_checkpoint", "read_state_dict"]
