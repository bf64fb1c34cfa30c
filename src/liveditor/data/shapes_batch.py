"""ShapeEdit rendered in batches with PyTorch, on the GPU (or the CPU), for training.

The reference renderer (`liveditor.data.shapes.generate_example`) draws one clip at a time in
numpy. This module draws the same clips, a batch at a time, on any torch device:

    from liveditor.data.shapes_batch import ShapeEditBatchRenderer, example_seeds

    renderer = ShapeEditBatchRenderer(config=None, device="cuda")      # ShapeEditConfig() default
    seeds = example_seeds(run_seed=0, stage=0, batch_index=step, batch_size=256,
                          rank=rank, world_size=world_size)           # disjoint per rank/step/stage
    batch = renderer.render(seeds, split="train")
    batch.source, batch.target     # uint8 [B, F, H, W, 3] on the device
    batch.instructions             # list of B strings; batch.families, batch.seeds likewise

Clip ``i`` equals ``generate_example(seeds[i], split)`` (same scene, edit and instruction); the
pixels are computed with the same float64 operations, so they are identical except, at most,
for a pixel whose centre lies within rounding distance of a shape's outline (none were seen on
CPU; `tests/data/test_shapes_batch.py` bounds the count).

Scene sampling is shared, not copied: `liveditor.data.shapes.EditCandidates` turns a seed into
scene parameters for both renderers. Drawing the scenes is Python work (a fraction of a
millisecond a clip), so a training loop can draw them in DataLoader workers and render in the
main process:

    stream = SceneBatchStream(batch_size=256, run_seed=0, stage=0, rank=rank, world_size=world)
    loader = DataLoader(stream, batch_size=None, num_workers=4)
    for scenes in loader:                          # SceneBatch: packed numpy arrays, picklable
        batch = renderer.render_scenes(scenes)     # on the GPU

How it is fast: every object is tested per row (``dx`` depends only on the column, ``dy`` only
on the row; polygon edges give one crossing per row), objects of one shape across the whole batch
are tested together, and frames are a tensor dimension. The Python work per batch is a loop over
the four shapes and the object slots, not over clips or pixels. `render_scenes` synchronises with
the device once per batch (to find the few clips whose edit is invisible and redraw them, as the
reference does); on CUDA it renders on its own stream, so that sync does not wait for training
work queued before it, and the caller's stream waits for the clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shapes import (
    BACKGROUND_COLORS,
    BACKGROUND_STYLES,
    EDGE_TOLERANCE,
    MIN_EDIT_PIXELS,
    OBJECT_COLORS,
    SHAPES,
    SPLITS,
    SQUARE_HALF_SIDE,
    STAR_POLYGON,
    TRIANGLE_DROP,
    TRIANGLE_POLYGON,
    EditCandidates,
    Scene,
    ShapeEditConfig,
    bounce_tracks,
    object_radius,
    render_background,
)

# ---------------------------------------------------------------------------------------------
# Example seeds: one stream per (run, stage), split between ranks and batches

RUN_SEED_BITS = 16
STAGE_BITS = 8
INDEX_BITS = 39  # 5.5e11 clips per stage; a seed stays below 2**63 (an int64)


def example_seeds(
    run_seed: int, stage: int, batch_index: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """The example seeds of one training batch: never shared between runs, stages, ranks or batches.

    ``run_seed`` (< 2**16) names the run (the training config's seed), ``stage`` (< 256) counts the
    runs of one recipe (``init_from`` continues with a new stage, so it never replays its parent's
    clips), ``batch_index`` counts the batches this rank drew in this stage (so a resumed run
    continues where it stopped). Seeds are ``(run_seed, stage)`` in the high bits and
    ``(batch_index * world_size + rank) * batch_size + i`` in the low 39 bits: disjoint by
    construction, and consecutive within a batch, so the six edit families stay balanced. Keep
    ``world_size`` and ``batch_size`` fixed within a stage (change them in a new stage).
    """
    values = {"run_seed": run_seed, "stage": stage, "batch_index": batch_index, "batch_size": batch_size,
              "rank": rank, "world_size": world_size}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} must be below world_size {world_size}")
    if run_seed >= 2**RUN_SEED_BITS or stage >= 2**STAGE_BITS:
        raise ValueError(f"run_seed must be < {2**RUN_SEED_BITS} and stage < {2**STAGE_BITS}, got {run_seed}, {stage}")
    first = (int(batch_index) * world_size + rank) * batch_size
    if first + batch_size > 2**INDEX_BITS:
        raise ValueError(f"batch {batch_index} is past the {2**INDEX_BITS} clips of one stage; start a new stage")
    base = ((int(run_seed) << STAGE_BITS | int(stage)) << INDEX_BITS) + first
    return list(range(base, base + batch_size))


# ---------------------------------------------------------------------------------------------
# Scene batches (CPU, picklable)

_SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}
_BACKGROUND_INDEX = {
    (style, color): i * len(BACKGROUND_COLORS) + j
    for i, style in enumerate(BACKGROUND_STYLES)
    for j, color in enumerate(BACKGROUND_COLORS)
}


def _pack_scenes(scenes: list[Scene], config: ShapeEditConfig) -> dict[str, np.ndarray]:
    """Scene parameters as arrays: ``background`` [N], per object slot ``shape`` [N, S] (-1: no
    object), ``color`` [N, S, 3], ``radius`` [N, S] and ``track`` [N, S, F, 2] (centre per frame,
    the reference's `bounce_tracks`)."""
    slots = config.max_objects + 1  # "add" puts one more object in the target
    n = len(scenes)
    shape = np.full((n, slots), -1, dtype=np.int64)
    color = np.zeros((n, slots, 3), dtype=np.uint8)
    motion = np.zeros((4, n, slots))  # x, y, vx, vy
    radius = np.ones((n, slots))
    background = np.empty(n, dtype=np.int64)
    for i, scene in enumerate(scenes):
        background[i] = _BACKGROUND_INDEX[scene.background_style, scene.background_color]
        for s, obj in enumerate(scene.objects):
            shape[i, s] = _SHAPE_INDEX[obj.shape]
            color[i, s] = OBJECT_COLORS[obj.color]
            radius[i, s] = object_radius(obj.size, config)
            motion[:, i, s] = obj.x, obj.y, obj.vx, obj.vy
    track = bounce_tracks(*motion, radius, config)
    return {"background": background, "shape": shape, "color": color, "radius": radius, "track": track}


@dataclass
class SceneBatch:
    """The first candidate edit of each example of a batch, drawn and packed on the CPU.

    ``scenes``: packed sources (rows ``0..B-1``) then targets (rows ``B..2B-1``), see
    `_pack_scenes`. Only arrays, strings and ints, because a DataLoader worker sends it to the
    main process, which unpickles it while it should be queuing training work: the draws' Scene
    objects and the candidates' random generators took 20-30 ms a batch of 256 to unpickle, plain
    data 0.1 ms (`benchmarks/bench_data.py`, row ``handoff``). An example whose edit is invisible
    is redrawn from its seed (`redraw_candidates`), which is rare and cheap.
    """

    config: ShapeEditConfig
    split: str
    family: str | None  # the family every example was drawn with; None: each seed's own
    seeds: list[int]
    instructions: list[str]
    families: list[str]
    scenes: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def draw(
        cls, seeds, split: str = "train", family: str | None = None, config: ShapeEditConfig | None = None
    ) -> "SceneBatch":
        """Draw the first candidate of every example ``(seed, split, family)``, as `generate_example` would."""
        config = ShapeEditConfig() if config is None else config
        candidates = [EditCandidates(seed, split, family, config) for seed in seeds]
        if not candidates:
            raise ValueError("a scene batch needs at least one seed")
        draws = [next(c) for c in candidates]
        scenes = _pack_scenes([d.source for d in draws] + [d.target for d in draws], config)
        return cls(config, split, family, [c.seed for c in candidates], [d.instruction for d in draws],
                   [d.family for d in draws], scenes)

    def redraw_candidates(self, index: int) -> EditCandidates:
        """Example ``index``'s candidate edits after the first, the one this batch holds."""
        candidates = EditCandidates(self.seeds[index], self.split, self.family, self.config)
        next(candidates)
        return candidates


# ---------------------------------------------------------------------------------------------
# Renderer


@dataclass
class ShapeEditBatch:
    """Rendered clips: ``source``/``target`` uint8 ``[B, F, H, W, 3]`` on the renderer's device."""

    source: torch.Tensor
    target: torch.Tensor
    instructions: list[str]
    families: list[str]
    seeds: list[int]


class ShapeEditBatchRenderer:
    """Render ShapeEdit clips in batches on ``device``; see the module docstring."""

    def __init__(self, config: ShapeEditConfig | None = None, device="cpu"):
        self.config = ShapeEditConfig() if config is None else config
        self.device = torch.device(device)
        H, W = self.config.height, self.config.width
        f64 = dict(dtype=torch.float64, device=self.device)
        self._column_centres = torch.arange(W, **f64) + 0.5
        self._row_centres = torch.arange(H, **f64) + 0.5
        self._backgrounds = torch.from_numpy(
            _pack_rgb(np.stack([render_background(style, color, H, W) for style, color in _BACKGROUND_INDEX]))
        ).to(self.device)  # [24, H, W] packed RGB
        # Polygon edges as device tensors: a CUDA division by a CPU scalar multiplies by its
        # reciprocal, which would round differently from numpy.
        self._polygons = {
            "triangle": self._edges(TRIANGLE_POLYGON),
            "star": self._edges(STAR_POLYGON),
        }
        # On CUDA, rendering runs on its own stream: its one host sync per batch then waits for
        # the rendering only, not for training work queued on the caller's stream.
        self._stream = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the tables above

    def _edges(self, polygon: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(x1, y1, x2 - x1, y2 - y1, y2)``, each float64 ``[E]`` over the polygon's edges (as
        the reference computes them, in numpy float64)."""
        following = np.roll(polygon, -1, axis=0)
        x1, y1, x2, y2 = polygon[:, 0], polygon[:, 1], following[:, 0], following[:, 1]
        return tuple(torch.from_numpy(np.stack([x1, y1, x2 - x1, y2 - y1, y2])).to(self.device).unbind())

    # -- public API ----------------------------------------------------------------------------

    def render(self, seeds, split: str = "train", family: str | None = None) -> ShapeEditBatch:
        """Clips ``generate_example(seed, split, family)`` for every seed, drawn and rendered here."""
        return self.render_scenes(SceneBatch.draw(seeds, split, family, self.config))

    def render_scenes(self, scenes: SceneBatch) -> ShapeEditBatch:
        """Render a drawn `SceneBatch`; examples whose first edit is invisible are redrawn from
        their seeds (``scenes`` is not changed)."""
        if scenes.config != self.config:
            raise ValueError(f"scene batch drawn for {scenes.config}, renderer is for {self.config}")
        if self._stream is None:
            return self._render_scenes(scenes)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            batch = self._render_scenes(scenes)
        # The caller's stream uses the clips: it waits for the rendering, and the allocator keeps
        # their memory until the caller's work on them is done.
        caller.wait_stream(self._stream)
        batch.source.record_stream(caller)
        batch.target.record_stream(caller)
        return batch

    def _render_scenes(self, scenes: SceneBatch) -> ShapeEditBatch:
        B = len(scenes.seeds)
        video = self._render(scenes.scenes)
        source, target = video[:B], video[B:]
        instructions = list(scenes.instructions)
        pending = np.flatnonzero(~self._visible(source, target).cpu().numpy())
        candidates = {int(i): scenes.redraw_candidates(int(i)) for i in pending}
        while pending.size:
            redraws = [next(candidates[int(i)]) for i in pending]
            video = self._render(_pack_scenes([d.source for d in redraws] + [d.target for d in redraws], self.config))
            new_source, new_target = video[: len(pending)], video[len(pending) :]
            index = torch.from_numpy(pending).to(self.device)
            source.index_copy_(0, index, new_source)
            target.index_copy_(0, index, new_target)
            for i, draw in zip(pending, redraws):
                instructions[i] = draw.instruction  # a redraw keeps the example's family
            pending = pending[~self._visible(new_source, new_target).cpu().numpy()]
        return ShapeEditBatch(
            source=_unpack_rgb(source),
            target=_unpack_rgb(target),
            instructions=instructions,
            families=list(scenes.families),
            seeds=list(scenes.seeds),
        )

    # -- rendering -----------------------------------------------------------------------------

    def _render(self, packed: dict[str, np.ndarray]) -> torch.Tensor:
        """Packed-RGB int32 ``[N, F, H, W]`` (see `_pack_rgb`) for packed scenes."""
        F, H, W = self.config.frames, self.config.height, self.config.width
        dev = self.device
        shape = packed["shape"]
        N, S = shape.shape
        track = torch.from_numpy(packed["track"]).to(dev).view(N * S, F, 2)
        radius = torch.from_numpy(packed["radius"]).to(dev).view(N * S, 1, 1)
        # ids: 1 + the slot of the topmost object per pixel, 0 for background.
        ids = torch.zeros(N, F, H, W, dtype=torch.uint8, device=dev)
        flat_shape = shape.reshape(-1)
        for shape_index, name in enumerate(SHAPES):
            objects = np.flatnonzero(flat_shape == shape_index)  # at most one per scene
            if objects.size == 0:
                continue
            flat_index, scene, slot = torch.from_numpy(np.stack([objects, objects // S, objects % S + 1])).to(dev)
            centres = track.index_select(0, flat_index)  # [n, F, 2]
            r = radius.index_select(0, flat_index)  # [n, 1, 1], a device tensor (see __init__)
            dx = ((self._column_centres - centres[..., 0:1]) / r)[:, :, None, :]  # [n, F, 1, W]
            dy = ((self._row_centres - centres[..., 1:2]) / r)[:, :, :, None]  # [n, F, H, 1]
            inside = self._inside(name, dx, dy)
            # Slots are drawn in order, so the topmost object has the highest slot.
            slot = slot.to(torch.uint8).view(-1, 1, 1, 1)
            ids.index_copy_(0, scene, torch.maximum(ids.index_select(0, scene), inside * slot))
        palette = torch.from_numpy(_pack_rgb(packed["color"])).to(dev)  # [N, S]
        palette = torch.cat([torch.zeros_like(palette[:, :1]), palette], dim=1)  # slot 0: background
        colours = torch.gather(palette, 1, ids.view(N, -1).long()).view(N, F, H, W)
        background = self._backgrounds.index_select(0, torch.from_numpy(packed["background"]).to(dev))
        return torch.where(ids == 0, background[:, None], colours)

    def _inside(self, name: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """bool ``[n, F, H, W]``; the same tests as `liveditor.data.shapes.shape_mask`."""
        if name == "circle":
            return dx * dx + dy * dy <= 1.0
        if name == "square":
            return (dx.abs() <= SQUARE_HALF_SIDE) & (dy.abs() <= SQUARE_HALF_SIDE)
        py = dy - TRIANGLE_DROP if name == "triangle" else dy
        x1, y1, x_span, y_span, y2 = self._polygons[name]
        # Even-odd rule: a row crosses an edge at most once, at x_at [n, F, H, E]; the pixels left
        # of each crossing flip.
        crosses = (y1 > py) != (y2 > py)
        x_at = torch.where(crosses, x1 + (py - y1) * x_span / y_span, -torch.inf)
        inside = dx < x_at[..., :1]
        for edge in range(1, x_at.shape[-1]):
            inside ^= dx < x_at[..., edge : edge + 1]
        return inside

    def _visible(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """bool ``[B]`` for packed-RGB videos: `liveditor.data.shapes.edit_is_visible` per clip."""
        changed = source != target
        channels = _rgb_channels(target)  # [B, F, H, W, 4]
        high, low = channels, channels
        for dim in (2, 3):  # 3x3 max and min, edge-padded like `interior_mask`
            high, low = _neighbourhood(high, dim, torch.maximum), _neighbourhood(low, dim, torch.minimum)
        flat = (high - low) <= EDGE_TOLERANCE
        interior = flat[..., 0] & flat[..., 1] & flat[..., 2]
        return (changed & interior).sum((1, 2, 3)) >= MIN_EDIT_PIXELS


def _neighbourhood(x: torch.Tensor, dim: int, reduce) -> torch.Tensor:
    """``reduce`` of each element and its two neighbours along ``dim``, the ends repeated."""
    n = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim)
    return reduce(reduce(padded.narrow(dim, 0, n), padded.narrow(dim, 1, n)), padded.narrow(dim, 2, n))


def _pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` as int32 ``[...]`` holding bytes r, g, b, 0 in memory order, so one
    int32 operation moves or compares a whole pixel."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] | rgb[..., 1] << 8 | rgb[..., 2] << 16


def _rgb_channels(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 4]`` view (r, g, b, 0) of packed-RGB int32 ``[...]`` (torch runs little-endian)."""
    return packed.view(torch.uint8).view(*packed.shape, 4)


def _unpack_rgb(packed: torch.Tensor) -> torch.Tensor:
    return _rgb_channels(packed)[..., :3].contiguous()


# ---------------------------------------------------------------------------------------------
# A stream of scene batches for DataLoader workers


class SceneBatchStream(IterableDataset):
    """Endless `SceneBatch` es of `example_seeds` for one rank, from batch ``start_batch`` on.

    Use with ``DataLoader(stream, batch_size=None, num_workers=k)``: worker ``w`` draws batches
    ``start_batch + w``, ``+ k``, ...; the DataLoader returns them in order, so the stream is the
    same for any number of workers. Render each with `ShapeEditBatchRenderer.render_scenes`.
    """

    def __init__(
        self,
        batch_size: int,
        run_seed: int = 0,
        stage: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        split: str = "train",
        config: ShapeEditConfig | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        example_seeds(run_seed, stage, start_batch, batch_size, rank, world_size)  # checks the arguments
        self.batch_size, self.run_seed, self.stage = batch_size, run_seed, stage
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.split = split
        self.config = ShapeEditConfig() if config is None else config

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batch_index = self.start_batch + worker_id
        while True:
            seeds = example_seeds(self.run_seed, self.stage, batch_index, self.batch_size, self.rank, self.world_size)
            yield SceneBatch.draw(seeds, self.split, None, self.config)
            batch_index += num_workers
