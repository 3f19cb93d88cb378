"""On-disk cache of the strict-FP32 reference the INT8 guard compares against (logits digests).

A rebuild of the same network on the same validation scans (another recipe, target or precision)
skips the FP32 reference pass, the costliest fixed part of a guarded build after quantizing. The key
is the network's identity (the engine passes e.g. the SHA-256 of the FP32 ONNX file and the runtime
version) plus the SHA-256 of every preprocessed validation sample, so a change of scan, preprocessing
or crop gives a new key. Stored under ``cache_dir("fp32_reference_digests")/<key>/``: per sample its
:class:`~engine_tools.accuracy.LogitsDigest` (``labels-NNNN.npy`` and ``sampled-NNNN.npy``: exact, so
the guard's agreement and SQNR are those of a fresh pass) and ``meta.json`` with the SHA-256 of each
file, the strides and the seconds each sample took. The folder is written
through :func:`engine_tools.cache.atomic_directory`; a file that changed or went missing since is
detected and the reference computed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine_tools.accuracy import LogitsDigest
from engine_tools.cache import atomic_directory, cache_dir, sha256_file, sha256_json

KIND = "fp32_reference_digests"
#: references above this size are stored only when recomputing them is slower than the round trip:
#: on a 2-core machine storing 1.2 GB of whole-volume logits (18 classes, 256^3) and loading it again,
#: both with SHA-256, took 25-39 s against a 19 s FP32 pass. A whole volume's digest (a byte per voxel
#: and at most 64 MiB of sampled logits) stays below it, so whole-volume references are stored too.
LARGE_BYTES = 256 * 2**20
#: bytes per second of that round trip (write + hash + read + hash), at the slow end of that
#: measurement: at 50e6 a loaded machine's 24.5 s pass counted as worth storing, and the first build
#: spent 24 s more storing it
ROUND_TRIP_BYTES_PER_S = 30e6


@dataclass
class CachedReference:
    """Reference digests per sample and the seconds the FP32 pass took for each when it was computed."""

    digests: list[LogitsDigest]
    seconds_per_sample: list[float]
    from_cache: bool = False


def sample_sha256(sample: np.ndarray) -> str:
    """SHA-256 of one preprocessed sample's shape, dtype and values."""
    contiguous = np.ascontiguousarray(sample)
    digest = hashlib.sha256(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()


def reference_key(network: str, samples: Sequence[np.ndarray]) -> str:
    """Cache key of the FP32 reference of ``network`` (an identity string) on ``samples``."""
    return sha256_json({"network": network, "samples": [sample_sha256(s) for s in samples]})


def reference_path(key: str) -> Path:
    return cache_dir(KIND) / key


def store(path: Path, reference: CachedReference) -> None:
    """Write the digests atomically, two ``.npy`` per sample, with their SHA-256 in ``meta.json``."""
    with atomic_directory(path) as tmp:
        files = []
        for index, item in enumerate(reference.digests):
            pair = []
            for part in ("labels", "sampled"):
                name = f"{part}-{index:04d}.npy"
                np.save(tmp / name, getattr(item, part))
                pair.append([name, sha256_file(tmp / name)])
            files.append({"files": pair, "stride": item.stride, "num_classes": item.num_classes})
        meta = {"samples": files, "seconds_per_sample": list(reference.seconds_per_sample)}
        (tmp / "meta.json").write_text(json.dumps(meta))


def load(path: Path) -> CachedReference | None:
    """The reference stored at ``path``, or ``None`` when missing, changed or truncated (the caller
    computes it again)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        found = []
        for sample in meta["samples"]:
            arrays = []
            for name, sha in sample["files"]:
                if sha256_file(path / name) != sha:
                    return None
                arrays.append(np.load(path / name))
            found.append(LogitsDigest(*arrays, int(sample["stride"]), int(sample["num_classes"])))
        seconds = [float(s) for s in meta["seconds_per_sample"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not found:
        return None
    return CachedReference(found, seconds, from_cache=True)


def computed_or_cached(
    network: str | None,
    samples: Sequence[np.ndarray],
    compute: Callable[[list[float]], list[LogitsDigest]],
) -> CachedReference:
    """The reference of ``network`` on ``samples`` from the cache, else ``compute(timings)`` (stored
    when ``network`` names the network; ``None``: nothing is cached)."""
    path = reference_path(reference_key(str(network), samples)) if network else None
    cached = load(path) if path is not None else None
    if cached is not None:
        return cached
    timings: list[float] = []
    result = CachedReference(compute(timings), timings)
    if path is not None and worth_storing(result):
        store(path, result)
    return result


def worth_storing(reference: CachedReference) -> bool:
    """Small references always (a whole volume's digest is small); large ones (many windows) only
    when their pass took longer than storing and reloading them would."""
    size = sum(int(d.labels.nbytes + d.sampled.nbytes) for d in reference.digests)
    return size <= LARGE_BYTES or sum(reference.seconds_per_sample) > size / ROUND_TRIP_BYTES_PER_S
