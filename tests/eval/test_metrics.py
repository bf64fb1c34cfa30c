import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liveditor.data.shapes import FAMILIES, generate_example
from liveditor.eval.metrics import (
    PSNR_CAP_DB,
    colour_centroids,
    edit_success,
    position_error_per_frame,
    psnr,
    ssim,
)


def _video(rng, shape=(3, 24, 20, 3)):
    return rng.integers(20, 236, size=shape, dtype=np.uint8)


def _ssim_slow(x, y):
    """Independent SSIM: explicit 2D Gaussian window over every valid position."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for f in range(x.shape[0]):
        for c in range(3):
            a, b = x[f, :, :, c].astype(np.float64), y[f, :, :, c].astype(np.float64)
            for i in range(a.shape[0] - 10):
                for j in range(a.shape[1] - 10):
                    pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                    cov = (w * pa * pb).sum() - ma * mb
                    values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_known_value():
    rng = np.random.default_rng()
    a = _video(rng)
    b = a + np.uint8(10)
    assert psnr(b, a) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr(a, a) == PSNR_CAP_DB


def test_ssim_matches_direct_definition():
    rng = np.random.default_rng()
    a = _video(rng, (2, 16, 18, 3))
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_slow(a, b), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a))


def test_metrics_reject_bad_videos():
    rng = np.random.default_rng()
    a = _video(rng)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="uint8"):
        ssim(a.astype(np.float32), a)


def _blur(video):
    t = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_success_criterion_separates_right_from_wrong(family):
    rng = np.random.default_rng()
    for seed in rng.choice(1000, 3, replace=False):
        ex = generate_example(int(seed), "test", family)
        assert edit_success(ex.target, ex.source, ex.target).success
        assert edit_success(_blur(ex.target), ex.source, ex.target).success  # soft edges are forgiven
        noisy = np.clip(ex.target + rng.normal(0, 8, ex.target.shape), 0, 255).astype(np.uint8)
        assert edit_success(noisy, ex.source, ex.target).success
        # Doing nothing fails, and so does a blurred copy of the input.
        nothing = edit_success(ex.source, ex.source, ex.target)
        assert not nothing.success and nothing.keep_accuracy == 1.0
        assert not edit_success(_blur(ex.source), ex.source, ex.target).success


def test_success_needs_the_rest_preserved():
    ex = generate_example(11, "test", "recolor")
    damaged = ex.target.copy()
    keep = ~ex.object_mask
    damaged[keep] = 255 - damaged[keep]  # right edit, ruined background
    result = edit_success(damaged, ex.source, ex.target)
    assert result.edit_accuracy == 1.0 and result.keep_accuracy < 0.5 and not result.success


def test_per_frame_edit_accuracy_says_which_frames_went_wrong():
    ex = generate_example(4, "test", "motion")  # the object moves differently in every frame but the first
    result = edit_success(ex.target, ex.source, ex.target)
    per_frame = result.edit_accuracy_per_frame
    changed = np.any(ex.source != ex.target, axis=-1)
    assert len(per_frame) == len(ex.target)
    assert [p is None for p in per_frame] == [not c.any() for c in changed]
    assert all(p == 1.0 for p in per_frame if p is not None)
    # The input in frames 9 on (the edit undone there): those frames fail, the earlier ones stay right.
    late = ex.target.copy()
    late[9:] = ex.source[9:]
    per_frame = edit_success(late, ex.source, ex.target).edit_accuracy_per_frame
    edited = [f for f, c in enumerate(changed) if c.any()]
    assert all(per_frame[f] == 1.0 for f in edited if f < 9)
    assert all(per_frame[f] < 0.5 for f in edited if f >= 9) and any(f >= 9 for f in edited)


def test_position_error_locates_an_object_by_its_colour():
    rng = np.random.default_rng(3)
    background = rng.integers(0, 60, size=(3, 20, 24, 3), dtype=np.uint8)  # never within 48 of the colour
    colour = (230, 40, 200)
    target, output = background.copy(), background.copy()
    target[0, 4:8, 2:6] = colour  # centre (4, 6)
    target[1, 10:12, 14:20] = colour  # centre (17, 11)
    target[2, 0:2, 0:2] = colour
    output[0, 7:11, 5:9] = (215, 55, 185)  # within tolerance, moved by (3, 3)
    output[1, 10:12, 14:20] = colour  # where the target has it
    # frame 2: the output lost the object
    centres = colour_centroids(target, colour)
    np.testing.assert_allclose(centres[:2], [[4.0, 6.0], [17.0, 11.0]])
    errors = position_error_per_frame(output, target, colour)
    assert errors[0] == pytest.approx(math.hypot(3, 3)) and errors[1] == 0.0 and errors[2] is None
    assert np.isnan(colour_centroids(output, colour)[2]).all()
    assert position_error_per_frame(output, target, colour, tolerance=10)[0] is None  # 15 off: not the object
