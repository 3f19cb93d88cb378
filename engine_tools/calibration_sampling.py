"""Where calibration windows are cut: tissue masks, foreground fractions of window positions, padding.

Foreground: after preprocessing, voxels brighter than half-way between the 1st percentile (air or
background) and the Otsu threshold, so that fat in CT and dark grey matter in MR count as tissue.
"""

from __future__ import annotations

import numpy as np

#: A scan whose best window holds less tissue than this is skipped as "mostly air".
MIN_BEST_FOREGROUND = 0.05
#: When no window reaches ``min_foreground``, windows within this factor of the best one are used.
NEAR_BEST = 0.8


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Tissue voxels of a preprocessed volume (half-way between the 1st percentile and Otsu)."""
    values = array.ravel()[:: max(1, array.size // 1_000_000)]
    low = float(np.percentile(values, 1))
    if float(values.max()) <= low:  # no contrast at all (e.g. only air): nothing to calibrate on
        return np.zeros(array.shape, dtype=bool)
    threshold = max(otsu(values), low)
    return array > low + 0.5 * (threshold - low)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def pad_to(array: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """Centre-pad ``(C, D, H, W)`` with zeros so every spatial axis is at least the window."""
    pads = [(0, 0)]
    for size, win in zip(array.shape[1:], window, strict=True):
        extra = max(win - size, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(array, pads) if any(p != (0, 0) for p in pads) else array


def window_fractions(
    mask: np.ndarray, window: tuple[int, int, int], stride: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground fraction of every window start on a ``stride`` grid (plus the last start per axis).

    Returns ``(corners (M, 3), fractions (M,))`` computed from a summed-volume table.
    """
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    starts = []
    for size, win, step in zip(mask.shape, window, stride, strict=True):
        axis = list(range(0, size - win + 1, step))
        if axis[-1] != size - win:
            axis.append(size - win)
        starts.append(np.asarray(axis))
    a, b, c = np.meshgrid(*starts, indexing="ij")
    a, b, c = a.ravel(), b.ravel(), c.ravel()
    wa, wb, wc = window
    total = (
        table[a + wa, b + wb, c + wc]
        - table[a, b + wb, c + wc]
        - table[a + wa, b, c + wc]
        - table[a + wa, b + wb, c]
        + table[a, b, c + wc]
        + table[a, b + wb, c]
        + table[a + wa, b, c]
        - table[a, b, c]
    )
    return np.stack([a, b, c], axis=1), total / float(wa * wb * wc)


def ordered_corners(
    array: np.ndarray, window: tuple[int, int, int], min_foreground: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """Qualifying window starts in a seeded random order, their fractions, and the best fraction."""
    mask = foreground_mask(array[0])
    stride = tuple(max(1, w // 16) for w in window)
    corners, fractions = window_fractions(mask, window, stride)  # type: ignore[arg-type]
    best = float(fractions.max()) if fractions.size else 0.0
    if best < MIN_BEST_FOREGROUND:
        return corners[:0], fractions[:0], best
    # a window larger than the anatomy (e.g. 192^3 in a conformed 256^3 head) cannot be mostly tissue:
    # then take the windows holding nearly the most tissue possible
    good = np.flatnonzero(fractions >= min(min_foreground, NEAR_BEST * best))
    order = rng.permutation(good)
    return corners[order], fractions[order], best


def cut_windows(
    array: np.ndarray,
    window: tuple[int, int, int],
    need: int,
    min_foreground: float,
    rng: np.random.Generator,
) -> tuple[list[tuple[np.ndarray, tuple[int, int, int], float]], float]:
    """Up to ``need`` windows ``(crop, corner, foreground fraction)`` of a padded ``C, D, H, W`` array
    in a seeded order, and the best window's foreground fraction; no windows when the array is mostly
    air. Positions are distinct: a window as large as the scan (deepbet's 256^3 on a conformed head)
    gives one sample, not ``need`` copies of it (copies add nothing to calibration ranges and cost a
    window's memory, time and cache space each)."""
    corners, fractions, best = ordered_corners(array, window, min_foreground, rng)
    if len(corners) == 0:
        return [], best
    items = []
    for corner, fraction in zip(corners[:need], fractions[:need], strict=True):
        a, b, c = (int(v) for v in corner)
        crop = array[:, a : a + window[0], b : b + window[1], c : c + window[2]].copy()
        items.append((crop, (a, b, c), round(float(fraction), 4)))
    return items, best


def evenly_spaced_windows(array: np.ndarray, window: tuple[int, int, int], count: int) -> np.ndarray:
    """``count`` windows of ``window`` placed evenly along the diagonal of a preprocessed ``C, D, H, W``
    volume (zero-padded where it is smaller than a window): deterministic windows for tests and benchmarks."""
    padded = np.pad(
        array, [(0, 0)] + [(0, max(0, w - s)) for s, w in zip(array.shape[1:], window, strict=True)]
    )
    windows = []
    for index in range(count):
        start = [
            int((s - w) * (index + 1) / (count + 1)) for s, w in zip(padded.shape[1:], window, strict=True)
        ]
        region = tuple(slice(b, b + w) for b, w in zip(start, window, strict=True))
        windows.append(padded[(slice(None), *region)])
    return np.stack(windows).astype(np.float32)
