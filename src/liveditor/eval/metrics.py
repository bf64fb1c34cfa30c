"""Video quality metrics on uint8 RGB videos ``[F, H, W, 3]``: PSNR, SSIM, and the ShapeEdit
success criterion.

Success (one clip). A pixel of the ground-truth target is *interior* when its 3x3 neighbourhood in
that frame has one colour (spans at most 8 of 255 per channel, so smooth gradients count); edges (one pixel wide, where a model may blur) are not judged. Let
``E`` be the interior pixels the edit must change (target differs from source; all changed pixels
if none of them is interior) and ``K`` the interior pixels it must keep (target equals source),
minus a one-pixel band around the changed pixels. A pixel of the output is *correct* when every
channel is within ``tolerance`` (default 48 of 255) of the target. Then

    edit accuracy = correct pixels in E / |E|     (the edited object has the right shape and colour,
                                                   the removed one is gone, the background is new)
    keep accuracy = correct pixels in K / |K|     (the rest of the video is preserved)

and the clip is a success when edit accuracy >= 0.8 and keep accuracy >= 0.95. Returning the input
unchanged fails every ShapeEdit clip (tested); returning the target always succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import interior_mask

PSNR_CAP_DB = 100.0  # identical videos: reported as this instead of infinity, so means stay finite

SUCCESS_TOLERANCE = 48
MIN_EDIT_ACCURACY = 0.8
MIN_KEEP_ACCURACY = 0.95


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    for name, x in (("output", a), ("reference", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be a uint8 array [F, H, W, 3], got {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over the whole video (one MSE over all frames, pixels and channels)."""
    _check_pair(output, reference)
    mse = np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2)
    if mse == 0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10 * np.log10(255.0**2 / mse)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(output: np.ndarray, reference: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) per frame and
    channel on the valid region, averaged over frames and channels."""
    _check_pair(output, reference)
    x = torch.from_numpy(output).permute(0, 3, 1, 2).double()  # [F, 3, H, W]
    y = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    window = _gaussian_window()
    size = window.numel()
    H, W = x.shape[-2:]
    if min(H, W) < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size}, got {H}x{W}")
    # The separable Gaussian filter over valid positions as two banded matrices: rows @ t @ cols.
    rows = torch.stack([F.pad(window, (i, H - size - i)) for i in range(H - size + 1)])  # [H', H]
    cols = torch.stack([F.pad(window, (j, W - size - j)) for j in range(W - size + 1)]).T  # [W, W']

    def blur(t):
        return rows @ t @ cols

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass(frozen=True)
class SuccessResult:
    success: bool
    edit_accuracy: float
    keep_accuracy: float
    # Edit accuracy of each frame alone; None where the frame has nothing to change. Shows where in
    # time an edit goes wrong (a motion edit after the object's first bounce, say).
    edit_accuracy_per_frame: tuple[float | None, ...]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 spatial dilation per frame of a bool [F, H, W] mask."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    H, W = mask.shape[1:]
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[:, dy : dy + H, dx : dx + W]
    return out


def edit_success(
    output: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    tolerance: int = SUCCESS_TOLERANCE,
    min_edit_accuracy: float = MIN_EDIT_ACCURACY,
    min_keep_accuracy: float = MIN_KEEP_ACCURACY,
) -> SuccessResult:
    """The ShapeEdit success criterion (module docstring) for one clip."""
    _check_pair(output, target)
    _check_pair(source, target)
    changed = np.any(source != target, axis=-1)
    interior = interior_mask(target)
    edit = changed & interior if (changed & interior).any() else changed
    keep = ~_dilate(changed) & interior
    error = np.abs(output.astype(np.int16) - target.astype(np.int16)).max(axis=-1)
    correct = error <= tolerance
    edit_accuracy = float(correct[edit].mean()) if edit.any() else 1.0
    keep_accuracy = float(correct[keep].mean()) if keep.any() else 1.0
    return SuccessResult(
        success=edit_accuracy >= min_edit_accuracy and keep_accuracy >= min_keep_accuracy,
        edit_accuracy=edit_accuracy,
        keep_accuracy=keep_accuracy,
        edit_accuracy_per_frame=tuple(float(c[e].mean()) if e.any() else None for c, e in zip(correct, edit)),
    )


def colour_centroids(video: np.ndarray, colour, tolerance: int = SUCCESS_TOLERANCE) -> np.ndarray:
    """float ``[F, 2]`` (x, y) mean position, in pixels, of each frame's pixels within `tolerance`
    (every channel) of `colour`; NaN in frames without such pixels. Pixel (col, row) sits at
    (col + 0.5, row + 0.5), as the ShapeEdit renderer places shape centres."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {video.shape}")
    match = (np.abs(video.astype(np.int16) - np.asarray(colour, dtype=np.int16)).max(axis=-1) <= tolerance)
    count = match.sum(axis=(1, 2)).astype(np.float64)
    rows, cols = np.arange(video.shape[1]) + 0.5, np.arange(video.shape[2]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (match.sum(axis=1) * cols).sum(axis=1) / count
        y = (match.sum(axis=2) * rows).sum(axis=1) / count
    return np.stack([x, y], axis=-1)


def position_error_per_frame(output: np.ndarray, target: np.ndarray, colour,
                             tolerance: int = SUCCESS_TOLERANCE) -> tuple[float | None, ...]:
    """Per frame, the distance in pixels between where an object of `colour` is in `output` and in
    `target` (centroids of its colour); None where either frame shows none of it."""
    _check_pair(output, target)
    distance = np.linalg.norm(colour_centroids(output, colour, tolerance) - colour_centroids(target, colour, tolerance),
                              axis=-1)
    return tuple(None if np.isnan(d) else float(d) for d in distance)
