import random

import numpy as np
import pytest

from liveditor.data import shapes
from liveditor.data.shapes import (
    BACKGROUND_COLORS,
    FAMILIES,
    KNOWN_VOCABULARY,
    OBJECT_COLORS,
    SHAPES,
    ShapeEditConfig,
    ShapeObject,
    check_instruction,
    generate_example,
    instruction_words,
    object_track,
    render_background,
    shape_mask,
)
from liveditor.errors import LIVEditorError

SEEDS = random.Random().sample(range(100_000), 4)


def _has_color(video, rgb):
    return np.all(video == np.array(rgb, dtype=np.uint8), axis=-1)


def test_deterministic_per_seed_and_split():
    seed = SEEDS[0]
    a, b = generate_example(seed, "train"), generate_example(seed, "train")
    assert np.array_equal(a.source, b.source) and np.array_equal(a.target, b.target)
    assert a.instruction == b.instruction and a.metadata == b.metadata
    c = generate_example(seed, "test")
    assert not np.array_equal(a.source, c.source)


def test_splits_do_not_share_clips():
    train = {generate_example(s, "train", "remove").source.tobytes() for s in range(20)}
    test = {generate_example(s, "test", "remove").source.tobytes() for s in range(20)}
    assert len(train) == 20 and not train & test


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_exact_and_local(family):
    for seed in SEEDS:
        ex = generate_example(seed, "val", family)
        F, H, W = 16, 64, 64
        assert ex.source.shape == ex.target.shape == (F, H, W, 3) and ex.source.dtype == np.uint8
        assert ex.object_mask.shape == ex.edit_mask.shape == (F, H, W)
        assert ex.family == family
        # The edit changes something visible, and nothing outside the edited thing.
        assert ex.edit_mask.sum() >= shapes.MIN_EDIT_PIXELS
        assert np.array_equal(ex.edit_mask, np.any(ex.source != ex.target, axis=-1))
        assert not np.any(ex.edit_mask & ~ex.object_mask)
        assert set(instruction_words(ex.instruction)) <= set(KNOWN_VOCABULARY)
        assert check_instruction(ex.instruction).in_domain


def test_family_semantics():
    seed = SEEDS[1]
    ex = generate_example(seed, "train", "remove")
    removed = ex.metadata["source_scene"]["objects"][ex.metadata["edit"]["object"]]
    assert f"{removed['color']} {removed['shape']}" in ex.instruction
    assert _has_color(ex.source, OBJECT_COLORS[removed["color"]]).any()
    assert not _has_color(ex.target, OBJECT_COLORS[removed["color"]]).any()

    ex = generate_example(seed, "train", "recolor")
    new = ex.metadata["edit"]["color"]
    assert new in ex.instruction
    assert not _has_color(ex.source, OBJECT_COLORS[new]).any()
    assert _has_color(ex.target, OBJECT_COLORS[new])[ex.object_mask].any()

    ex = generate_example(seed, "train", "add")
    edit = ex.metadata["edit"]
    assert all(edit[k] in ex.instruction for k in ("shape", "color", "size", "place"))
    added = _has_color(ex.target, OBJECT_COLORS[edit["color"]])
    # Static: the added object covers the same pixels in every frame unless something passes over it.
    assert added.any() and np.array_equal(added.any(0), ex.object_mask.any(0))

    ex = generate_example(seed, "train", "background")
    style, color = ex.metadata["edit"]["style"], ex.metadata["edit"]["color"]
    assert color in ex.instruction
    expected = render_background(style, color, 64, 64)
    bg = ex.object_mask
    assert np.array_equal(ex.target[bg], np.broadcast_to(expected, ex.target.shape)[bg])

    ex = generate_example(seed, "train", "motion")
    moved = ex.metadata["target_scene"]["objects"][ex.metadata["edit"]["object"]]
    before = ex.metadata["source_scene"]["objects"][ex.metadata["edit"]["object"]]
    motion = ex.metadata["edit"]["motion"]
    v0, v1 = np.array([before["vx"], before["vy"]]), np.array([moved["vx"], moved["vy"]])
    expected_v = {"reverse": -v0, "stop": 0 * v0, "faster": 2 * v0}.get(motion)
    if expected_v is not None:
        assert np.allclose(v1, expected_v)
    else:
        assert np.isclose(np.linalg.norm(v1), np.linalg.norm(v0))


def test_objects_have_unique_shapes_and_colours():
    for seed in range(30):
        scene = generate_example(seed, "train").metadata["target_scene"]
        objs = scene["objects"]
        assert len({o["shape"] for o in objs}) == len(objs)
        assert len({o["color"] for o in objs}) == len(objs)
        assert scene["background_color"] in BACKGROUND_COLORS


def test_tracks_bounce_inside_the_frame():
    rng = np.random.default_rng()
    config = ShapeEditConfig(frames=64)
    for _ in range(20):
        obj = ShapeObject("circle", "red", "large", *rng.uniform(12, 52, 2), *rng.uniform(-9, 9, 2))
        track = object_track(obj, config)
        r = shapes.SIZES["large"] * 64
        assert track.min() >= r - 1e-9 and track.max() <= 64 - r + 1e-9
        assert np.allclose(track[0], [obj.x, obj.y])
        # Between bounces it moves at its speed: a step is never longer than |v|.
        steps = np.abs(np.diff(track, axis=0))
        assert np.all(steps <= np.abs([obj.vx, obj.vy]) + 1e-9)


def test_shapes_are_distinct_and_comparable_in_area():
    masks = {s: shape_mask(s, 32.0, 32.0, 12.0, 64, 64) for s in SHAPES}
    areas = {s: m.sum() for s, m in masks.items()}
    assert min(areas.values()) > 0.25 * max(areas.values())
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 20


def test_configurable_geometry():
    config = ShapeEditConfig(frames=5, height=32, width=48, max_objects=2)
    ex = generate_example(SEEDS[2], "train", config=config)
    assert ex.source.shape == (5, 32, 48, 3)
    assert len(ex.metadata["source_scene"]["objects"]) <= 2


def test_domain_check():
    assert check_instruction("remove the red circle").in_domain
    check = check_instruction("make the cat wear a hat")
    assert not check.in_domain and "cat" in check.unknown_words and "cat" in check.message
    assert not check_instruction("make it go").in_domain  # known words, nothing named
    with pytest.raises(LIVEditorError, match="empty"):
        check_instruction("   ")


@pytest.mark.parametrize(
    "kwargs, key",
    [({"frames": 0}, "frames"), ({"height": 8}, "height"), ({"max_objects": 4}, "max_objects"), ({"min_objects": 3, "max_objects": 2}, "min_objects")],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ShapeEditConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_example(0, "holdout")
    with pytest.raises(ValueError, match="family"):
        generate_example(0, "train", "rotate")
    with pytest.raises(ValueError, match="seed"):
        generate_example(-1)
