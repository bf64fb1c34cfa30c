import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from liveditor.data.shapes import FAMILIES, ShapeEditConfig, generate_example, interior_mask
from liveditor.data.shapes_batch import (
    INDEX_BITS,
    SceneBatch,
    SceneBatchStream,
    ShapeEditBatchRenderer,
    example_seeds,
)

SMALL = ShapeEditConfig(frames=5, height=32, width=48, max_objects=2)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]
# Both renderers evaluate the same float64 expressions in the same order, so a pixel can only
# come out differently if its centre lies within rounding distance (~1e-15) of a shape's outline:
# none in these clips on CPU. The bound admits one such pixel per 10 clips, on an outline only;
# any real geometry error (a shape moved by a fraction of a pixel) changes hundreds of pixels.
MAX_OUTLINE_DIFFERENCES_PER_CLIP = 0.1


def _assert_matches_reference(batch, seeds, split, family, config, context):
    differences = 0
    for i, seed in enumerate(seeds):
        ref = generate_example(seed, split, family, config)
        assert batch.instructions[i] == ref.instruction and batch.families[i] == ref.family, f"{context} seed {seed}"
        for name, rendered, expected in (("source", batch.source[i], ref.source), ("target", batch.target[i], ref.target)):
            assert rendered.dtype == torch.uint8 and tuple(rendered.shape) == expected.shape, f"{context} seed {seed}"
            differ = np.any(rendered.cpu().numpy() != expected, axis=-1)
            assert not np.any(differ & interior_mask(expected)), f"{context} seed {seed} {name}: differs inside a shape"
            differences += int(differ.sum())
    assert differences <= MAX_OUTLINE_DIFFERENCES_PER_CLIP * len(seeds), f"{context}: {differences} outline pixels differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split, first_seed", [("train", 0), ("test", 1000), ("val", 123_456)])
def test_equals_reference_renderer(device, split, first_seed):
    seeds = list(range(first_seed, first_seed + 24))  # 4 clips of each family
    batch = ShapeEditBatchRenderer(device=device).render(seeds, split)
    assert batch.source.device.type == device and batch.seeds == seeds
    _assert_matches_reference(batch, seeds, split, None, ShapeEditConfig(), f"{device} {split}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_reference_per_family_other_geometry(device, family):
    seeds = list(range(40, 52))
    batch = ShapeEditBatchRenderer(SMALL, device).render(seeds, "train", family)
    assert batch.families == [family] * len(seeds)
    _assert_matches_reference(batch, seeds, "train", family, SMALL, f"{device} {family}")


@pytest.mark.parametrize("family", [None, "recolor"])
@pytest.mark.parametrize("device", DEVICES)
def test_equals_reference_where_edits_are_redrawn(device, family):
    # At 32x48 with 5 frames many first candidates are invisible (redrawn), some several times;
    # a redraw starts again from the example's seed and the family it was drawn with.
    attempts = {s: generate_example(s, "val", family, config=SMALL).metadata["attempts"] for s in range(60)}
    seeds = [s for s, n in attempts.items() if n > 1]
    assert len(seeds) >= 8 and max(attempts.values()) > 2, attempts
    batch = ShapeEditBatchRenderer(SMALL, device).render(seeds, "val", family)
    _assert_matches_reference(batch, seeds, "val", family, SMALL, f"{device} {family} redrawn")


def test_scene_batch_pickles_and_renders_repeatably():
    scenes = SceneBatch.draw(range(300, 316), "train", config=SMALL)
    # What a loader worker sends the training process is plain data (arrays, strings, ints), cheap
    # to unpickle there: no Scene objects or random generators.
    plain = (np.ndarray, str, int, type(None), ShapeEditConfig)
    for name, value in vars(scenes).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        assert all(isinstance(item, plain) for item in items), name
    restored = pickle.loads(pickle.dumps(scenes))
    renderer = ShapeEditBatchRenderer(SMALL)
    first, second = renderer.render_scenes(restored), renderer.render_scenes(restored)
    assert torch.equal(first.source, second.source) and torch.equal(first.target, second.target)
    assert first.instructions == second.instructions
    assert torch.equal(first.target, renderer.render(range(300, 316)).target)


def test_config_mismatch_is_an_error():
    scenes = SceneBatch.draw([1, 2], config=SMALL)
    with pytest.raises(ValueError, match="renderer is for"):
        ShapeEditBatchRenderer(ShapeEditConfig()).render_scenes(scenes)
    with pytest.raises(ValueError, match="seed"):
        ShapeEditBatchRenderer(SMALL).render([-1])


@pytest.mark.parametrize("run_seed, stage", [(0, 0), (7, 3), (2**16 - 1, 255)])
def test_example_seeds_never_overlap(run_seed, stage):
    world, batch = 3, 6
    seen = {}
    for key in [(r, s, rank, step) for r in (run_seed, run_seed ^ 1) for s in (stage, stage ^ 1)
                for rank in range(world) for step in range(5)]:
        r, s, rank, step = key
        seeds = example_seeds(r, s, step, batch, rank, world)
        assert len(seeds) == batch and len(set(seeds)) == batch and min(seeds) >= 0 and max(seeds) < 2**63
        for seed in seeds:
            assert seed not in seen, f"seed {seed} of {key} already drawn by {seen[seed]}"
            seen[seed] = key
    # Within one stream the ranks' batches tile the index range: nothing skipped or repeated.
    stream = sorted(s for s, k in seen.items() if k[:2] == (run_seed, stage))
    assert stream == list(range(stream[0], stream[0] + 5 * world * batch))
    # Consecutive seeds cycle through the families, so every batch of 6 is balanced.
    assert sorted(s % len(FAMILIES) for s in example_seeds(run_seed, stage, 4, 6, 2, 3)) == list(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_seed": 2**16}, "run_seed"),
        ({"stage": 256}, "stage"),
        ({"rank": 3}, "rank"),
        ({"batch_size": 0}, "positive"),
        ({"batch_index": -1}, "batch_index"),
        ({"batch_index": 2**INDEX_BITS // 6 + 1}, "new stage"),
    ],
)
def test_example_seeds_reject_bad_arguments(kwargs, message):
    arguments = dict(run_seed=0, stage=0, batch_index=0, batch_size=2, rank=0, world_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        example_seeds(**arguments)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_scene_stream_is_the_same_for_any_number_of_workers(num_workers):
    stream = SceneBatchStream(batch_size=4, run_seed=5, stage=1, rank=1, world_size=2, start_batch=3, config=SMALL)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    batches = [scenes for scenes, _ in zip(loader, range(3))]
    assert [b.seeds for b in batches] == [example_seeds(5, 1, 3 + i, 4, 1, 2) for i in range(3)]
    renderer = ShapeEditBatchRenderer(SMALL)
    rendered = renderer.render_scenes(batches[1])
    assert torch.equal(rendered.source, renderer.render(example_seeds(5, 1, 4, 4, 1, 2)).source)


def test_batched_draw_follows_the_family_weights_as_the_reference_does():
    config = ShapeEditConfig(family_weights=(2, 0, 0, 0, 0, 1))
    seeds = list(range(9))
    batch = ShapeEditBatchRenderer(config, "cpu").render(seeds)
    assert batch.families == [config.family_of(s) for s in seeds] == ["swap", "swap", "motion"] * 3
    assert batch.instructions == [generate_example(s, "train", config=config).instruction for s in seeds]
