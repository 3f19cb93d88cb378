"""A card's network files, without PyTorch: the weight files a network is built from and the error
type of network problems (the loaders of :mod:`engine_tools.networks.loaders` need PyTorch; finding a
cached export or engine must not)."""

from __future__ import annotations

from pathlib import Path

from engine_tools.progress import Progress
from engine_tools.registry import ModelCard
from engine_tools.weights import ensure_weights

#: formats whose loader ships with the package (others are registered at run time)
BUILTIN_FORMATS = ("tfjs", "torchscript", "monai", "torch")


class NetworkError(ValueError):
    """The card's network cannot be built or exported; the message names the card and the field."""


def _where(card: ModelCard) -> str:
    return str(card.path or card.id)


def card_file(card: ModelCard, files: dict[str, Path], key: str = "file", name: str | None = None) -> Path:
    """The weights file that ``network.<key>`` names (``name``: the value already read from there)."""
    name = name or card.network.get(key)
    if not name:
        raise NetworkError(f"{_where(card)}: network.{key} must name one of the weights files")
    if name not in files:
        raise NetworkError(
            f"{_where(card)}: network.{key} {name!r} is not among weights.files ({', '.join(files)})"
        )
    return files[name]


def network_files(
    card: ModelCard,
    weights_dir: str | Path | None,
    random_weights: bool,
    progress: Progress | None = None,
) -> dict[str, Path] | None:
    """The card's weight files by name (mirror, cache or download); ``None`` when none are needed
    (random weights; a TF.js network still needs its topology file)."""
    if card.network.get("format") not in BUILTIN_FORMATS:
        from engine_tools.networks.loaders import _loader

        _loader(card)  # unknown formats fail before anything is downloaded
    if random_weights and card.network["format"] != "tfjs":
        return None
    return ensure_weights(card, weights_dir, progress=progress)
