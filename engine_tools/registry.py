"""Model cards and the model registry.

A model card is one JSON file under ``Resources/ModelCards/`` (the top-level ``Resources`` folder of
the extension; ``$MEDQUANT_MODEL_CARDS`` adds more folders, ``os.pathsep``-separated). Schema::

    {
      "id": "brainchop-model18cls",            # unique, used on the command line
      "title": "...", "task": "...", "modality": "MR" | "CT",
      "architecture": "MeshNet",               # family name shown to users
      "labels": [{"value": 0, "name": "background", "color": [0, 0, 0],
                  "terminology": {...}?}, ...],
      "preprocessing": {
        "orientation": "RAS" | "LIA" | ...,    # axis codes (nibabel convention: +x toward R ...)
        "spacing": [1.0, 1.0, 1.0],            # mm, or null to keep the input spacing
        "shape": [256, 256, 256] | null,       # conform to this grid (centre crop / pad), optional
        "intensity": {"rule": "quantile" | "window" | "zscore" | "none", ...}
      },
      "window": {"size": [96, 96, 96], "overlap": 0.5, "blend": "gaussian", "batch": 1,
                 "crop_foreground": true},    # whole-volume pass: crop to the head first (default)
      "network": {"format": "monai" | "torch" | "tfjs" | "onnx" | "torchscript",
                  "builder": "monai.networks.nets.UNet", "kwargs": {...},   # monai/torch
                  "file": "model.json", "channels_last": true, ...,         # file formats
                  "in_channels": 1, "num_classes": 18,
                  "receptive_field": 93,       # voxels; the crop margin of a whole-volume pass
                  "fully_convolutional": true},  # same logits at any input size: one pass, no windows
      "weights": {"files": [{"name": "...", "url": "...", "sha256": "..." | null, "size": int | null,
                             "member": "path inside an archive"?}],
                  "licence": "MIT", "source": "where the publisher documents it", "notes": "..."},
      "quantization": {"keep_higher_precision": ["regex of layer names"], "notes": "..."}
    }

Everything that reads a card goes through :class:`ModelCard`. Published files that are not weights (the
demo's scans) are listed in data cards, ``Resources/DataCards/<id>.json`` (:class:`DataCard`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARDS_ENV = "MEDQUANT_MODEL_CARDS"
DEFAULT_CALIBRATION_WINDOWS = 32
REQUIRED_KEYS = ("id", "title", "task", "modality", "labels", "preprocessing", "window", "network", "weights")


def resources_dir() -> Path:
    """The extension's ``Resources`` folder (beside ``engine_tools`` in a checkout or installed extension)."""
    return Path(__file__).resolve().parent.parent / "Resources"


def user_cards_dir() -> Path:
    """Cards of bring-your-own models (``medquant models add``): ``<cache root>/cards``."""
    from engine_tools.cache import cache_root

    return cache_root() / "cards"


def default_card_dirs() -> list[Path]:
    dirs = [resources_dir() / "ModelCards"]
    extra = os.environ.get(CARDS_ENV, "")
    dirs += [Path(p).expanduser() for p in extra.split(os.pathsep) if p]
    dirs.append(user_cards_dir())
    return dirs


class CardError(ValueError):
    """A model card is malformed; the message names the file and the field."""


@dataclass
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict[str, Any] | None = None


@dataclass
class ModelCard:
    id: str
    title: str
    task: str
    modality: str
    labels: list[Label]
    preprocessing: dict[str, Any]
    window: dict[str, Any]
    network: dict[str, Any]
    weights: dict[str, Any]
    architecture: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.network.get("num_classes", len(self.labels)))

    @property
    def in_channels(self) -> int:
        return int(self.network.get("in_channels", 1))

    @property
    def window_size(self) -> tuple[int, int, int]:
        size = self.window["size"]
        return (size, size, size) if isinstance(size, int) else tuple(int(s) for s in size)  # type: ignore[return-value]

    @property
    def calibration_windows(self) -> int:
        """Default number of calibration windows (``quantization.calibration_windows``, else 32)."""
        return int(self.quantization.get("calibration_windows", DEFAULT_CALIBRATION_WINDOWS))

    @property
    def licence(self) -> str:
        return str(self.weights.get("licence", "unknown"))

    def label_table(self) -> list[dict[str, Any]]:
        """Labels as plain dicts (value, name, color) for JSON output and the Slicer module."""
        return [
            {
                "value": lab.value,
                "name": lab.name,
                "color": list(lab.color),
                **({"terminology": lab.terminology} if lab.terminology else {}),
            }
            for lab in self.labels
        ]

    def summary(self) -> dict[str, Any]:
        """What ``medquant models`` lists."""
        return {
            "id": self.id,
            "title": self.title,
            "architecture": self.architecture,
            "task": self.task,
            "modality": self.modality,
            "num_labels": len(self.labels),
            "window": list(self.window_size),
            "network_format": self.network.get("format"),
            "licence": self.licence,
            "weights_urls": [f.get("url") or f.get("download_page") for f in self.weights.get("files", [])],
            "weights_manual": any(f.get("manual") for f in self.weights.get("files", [])),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> ModelCard:
        where = str(path) if path else data.get("id", "<card>")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise CardError(f"{where}: model card lacks {', '.join(missing)}")
        try:
            labels = [
                Label(
                    int(lab["value"]),
                    str(lab["name"]),
                    tuple(int(c) for c in lab.get("color", (128, 128, 128))),
                    lab.get("terminology"),
                )  # type: ignore[arg-type]
                for lab in data["labels"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise CardError(f"{where}: bad 'labels' entry ({exc})") from exc
        if "size" not in data["window"]:
            raise CardError(f"{where}: 'window' needs a 'size'")
        if "format" not in data["network"]:
            raise CardError(f"{where}: 'network' needs a 'format'")
        known = {k for k in cls.__dataclass_fields__ if k not in ("labels", "path", "raw")}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(labels=labels, path=path, raw=data, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CardError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, path)


def load_cards(dirs: list[Path] | None = None) -> dict[str, ModelCard]:
    """All cards in ``dirs`` (default: the extension's and ``$MEDQUANT_MODEL_CARDS``), by id."""
    cards: dict[str, ModelCard] = {}
    for folder in dirs if dirs is not None else default_card_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            card = ModelCard.from_file(path)
            if card.id in cards:
                raise CardError(f"{path}: duplicate model id {card.id!r} (also in {cards[card.id].path})")
            cards[card.id] = card
    return cards


def get_card(model: str) -> ModelCard:
    """A card by id, or from a path to a card JSON file (bring-your-own models)."""
    if model.endswith(".json") and Path(model).is_file():
        return ModelCard.from_file(model)
    cards = load_cards()
    if model not in cards:
        raise KeyError(
            f"unknown model {model!r}; `medquant models` lists: {', '.join(sorted(cards)) or 'none'}"
        )
    return cards[model]


DATA_CARDS_ENV = "MEDQUANT_DATA_CARDS"


@dataclass
class DataCard:
    """Published files that are not weights (e.g. the demo's scans): ``Resources/DataCards/<id>.json``::

        {"id": "demo", "title": "...", "files": [{"name": "...", "role": "scan", "url": "...",
                                                 "sha256": "...", "size": int, "licence": "..."}]}

    ``files`` entries follow ``weights.files`` of a model card, so :mod:`engine_tools.weights` finds,
    downloads and verifies them the same way, into ``<cache>/data/<id>/``.
    """

    id: str
    title: str
    files: list[dict[str, Any]]
    path: Path | None = None
    cache_kind = "data"

    @property
    def weights(self) -> dict[str, Any]:
        """The file entries where the downloader reads them (the schema model cards use)."""
        return {"files": self.files}

    def with_roles(self, roles: set[str]) -> DataCard:
        """The same card restricted to the files whose ``role`` is in ``roles``."""
        return DataCard(self.id, self.title, [f for f in self.files if f.get("role") in roles], self.path)


def data_card_dirs() -> list[Path]:
    """``$MEDQUANT_DATA_CARDS`` folders first (they replace a shipped card of the same id), then ours."""
    extra = os.environ.get(DATA_CARDS_ENV, "")
    return [*(Path(p).expanduser() for p in extra.split(os.pathsep) if p), resources_dir() / "DataCards"]


def get_data_card(card_id: str) -> DataCard:
    """The first ``<card_id>.json`` in :func:`data_card_dirs`."""
    for folder in data_card_dirs():
        path = folder / f"{card_id}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CardError(f"{path}: not valid JSON ({exc})") from exc
        files = data.get("files")
        if data.get("id") != card_id or not isinstance(files, list) or not files:
            raise CardError(
                f"{path}: a data card needs 'id' equal to {card_id!r} and a non-empty 'files' list"
            )
        return DataCard(card_id, str(data.get("title", card_id)), files, path)
    raise KeyError(f"no data card {card_id!r} in {', '.join(str(d) for d in data_card_dirs())}")
