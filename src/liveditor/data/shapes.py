"""ShapeEdit: a procedural video-editing domain with exact ground truth.

A ShapeEdit clip is a short video of flat-coloured shapes (circle, square, triangle, star) moving
in straight lines and bouncing off the frame edges over a static background (solid, gradient,
stripes, checkerboard). One edit is applied to the scene description and both scenes are
rendered, so the target video is exact, pixel for pixel. Edit families mirror the paper's:

- ``swap``: replace an object by another shape (same colour, size and motion);
- ``recolor``: give an object another colour (the paper's "stylise an object");
- ``add``: add a static object of a named colour, shape and size at a named place;
- ``remove``: delete an object, revealing the background (and anything it hid);
- ``background``: change the background style and colour (the paper's "style transfer");
- ``motion``: reverse, stop, speed up or redirect an object's motion.

Every object in a scene has a distinct shape and a distinct colour, so "the red circle" always
names exactly one object. Generation is deterministic per ``(seed, split)``; the splits draw from
independent random streams, so the held-out split never repeats a training clip.

    from liveditor.data.shapes import generate_example
    ex = generate_example(7, split="test")
    ex.source, ex.target          # uint8 [F, H, W, 3]
    ex.instruction, ex.family     # "remove the red circle", "remove"
    ex.object_mask, ex.edit_mask  # bool [F, H, W]
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import InvalidArgumentError, LIVEditorError

FAMILIES = ("swap", "recolor", "add", "remove", "background", "motion")
SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.10, "medium": 0.14, "large": 0.18}  # radius as a fraction of min(H, W)

OBJECT_COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 240),
    "yellow": (245, 215, 40),
    "purple": (165, 65, 215),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
# Backgrounds are darker than every object colour so objects always stand out.
BACKGROUND_COLORS = {
    "black": (18, 18, 22),
    "gray": (100, 100, 105),
    "navy": (25, 35, 95),
    "teal": (20, 90, 90),
    "maroon": (95, 25, 40),
    "olive": (85, 85, 25),
}
BACKGROUND_STYLES = ("solid", "gradient", "stripes", "checkerboard")
PLACES = {  # where "add" puts the new object, as fractions of (width, height)
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
MOTIONS = ("reverse", "stop", "faster", "left", "right", "up", "down")

# Paraphrase templates per family. Fields: {obj} "the red circle", {shape}, {color}, {size},
# {place}, {bg}, "navy stripes" style background phrase.
TEMPLATES = {
    "swap": (
        "replace {obj} with a {shape}",
        "turn {obj} into a {shape}",
        "swap {obj} for a {color} {shape}",
        "change {obj} into a {shape}",
        "make {obj} a {shape} instead",
    ),
    "recolor": (
        "make {obj} {color}",
        "paint {obj} {color}",
        "change the color of {obj} to {color}",
        "recolor {obj} {color}",
        "turn {obj} {color}",
    ),
    "add": (
        "add a {size} {color} {shape} at the {place}",
        "put a {size} {color} {shape} in the {place}",
        "place a {size} {color} {shape} at the {place}",
        "insert a {size} {color} {shape} in the {place}",
    ),
    "remove": (
        "remove {obj}",
        "delete {obj}",
        "erase {obj}",
        "take out {obj}",
        "get rid of {obj}",
    ),
    "background": (
        "change the background to {bg}",
        "make the background {bg}",
        "replace the background with {bg}",
        "turn the background into {bg}",
    ),
    "motion": {
        "reverse": (
            "make {obj} move the other way",
            "reverse the direction of {obj}",
            "make {obj} go backwards",
        ),
        "stop": (
            "make {obj} stand still",
            "stop {obj}",
            "keep {obj} still",
        ),
        "faster": (
            "make {obj} move twice as fast",
            "speed up {obj}",
            "make {obj} go faster",
        ),
        "left": ("make {obj} move left", "move {obj} to the left"),
        "right": ("make {obj} move right", "move {obj} to the right"),
        "up": ("make {obj} move up", "move {obj} upwards"),
        "down": ("make {obj} move down", "move {obj} downwards"),
    },
}
BACKGROUND_PHRASES = {
    "solid": ("solid {color}", "plain {color}"),
    "gradient": ("a {color} gradient", "{color} gradient"),
    "stripes": ("{color} stripes", "a {color} striped pattern"),
    "checkerboard": ("a {color} checkerboard", "{color} checkerboard"),
}

MIN_EDIT_PIXELS = 24  # an edit must change at least this many non-edge pixels over the clip
EDGE_TOLERANCE = 8  # a pixel is on an edge when its 3x3 neighbourhood spans more than this


def instruction_words(text: str) -> list[str]:
    """Lower-case words of an instruction (letters only): the domain text encoder's tokens."""
    return re.findall(r"[a-z]+", text.lower())


def _vocabulary() -> tuple[str, ...]:
    texts = []
    for templates in TEMPLATES.values():
        groups = templates.values() if isinstance(templates, dict) else [templates]
        for group in groups:
            texts.extend(group)
    for group in BACKGROUND_PHRASES.values():
        texts.extend(group)
    texts += list(SHAPES) + list(SIZES) + list(OBJECT_COLORS) + list(BACKGROUND_COLORS) + list(PLACES)
    words = set()
    for t in texts:
        words.update(w for w in instruction_words(re.sub(r"\{\w+\}", " ", t)))
    return tuple(sorted(words))


KNOWN_VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word a ShapeEdit instruction can contain (sorted)."""


@dataclass(frozen=True)
class DomainCheck:
    """Whether an instruction lies inside what a ShapeEdit-trained model knows."""

    in_domain: bool
    unknown_words: tuple[str, ...]
    message: str


def check_instruction(text: str) -> DomainCheck:
    """Check an instruction against the ShapeEdit domain.

    Out of domain: words never seen in training, or no shape/colour/background named at all.
    Callers warn (the model still runs); an empty instruction is an error.
    """
    if not isinstance(text, str) or not text.strip():
        raise LIVEditorError("the instruction is empty")
    words = instruction_words(text)
    known = set(KNOWN_VOCABULARY)
    unknown = tuple(dict.fromkeys(w for w in words if w not in known))
    subjects = set(SHAPES) | set(OBJECT_COLORS) | set(BACKGROUND_COLORS) | {"background"}
    if unknown:
        message = (
            f"instruction is outside the ShapeEdit domain the tiny model was trained on "
            f"(unknown words: {', '.join(unknown)}); the edit will likely be wrong"
        )
    elif not subjects.intersection(words):
        message = (
            "instruction names no shape, colour or background from the ShapeEdit domain; "
            "the edit will likely be wrong"
        )
    else:
        return DomainCheck(True, (), "")
    return DomainCheck(False, unknown, message)


@dataclass(frozen=True)
class ShapeEditConfig:
    """Clip geometry and scene complexity."""

    frames: int = 16
    height: int = 64
    width: int = 64
    min_objects: int = 1
    max_objects: int = 3
    min_speed: float = 0.04  # pixels per frame, as a fraction of min(H, W)
    max_speed: float = 0.09
    # Relative share of each edit family (FAMILIES order) among seeds drawn without a family: family
    # f takes family_weights[f] consecutive places in a cycle of sum(family_weights) seeds. The
    # default, one each, is FAMILIES[seed % 6].
    family_weights: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    # Relative share of each kind of motion edit (MOTIONS order) among motion edits; the default,
    # one each, is a uniform draw (the same draw, and so the same clips, as before the option).
    motion_weights: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1)

    def __post_init__(self):
        for name, names in (("family_weights", FAMILIES), ("motion_weights", MOTIONS)):
            weights = tuple(getattr(self, name))
            if len(weights) != len(names) or not sum(weights) or any(
                    isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in weights):
                raise InvalidArgumentError(f"ShapeEditConfig.{name} must be {len(names)} non-negative ints "
                                           f"({', '.join(names)}), not all 0; got {getattr(self, name)!r}")
            object.__setattr__(self, name, weights)  # a list from a config file becomes a tuple
        for name in ("frames", "height", "width", "min_objects", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"ShapeEditConfig.{name} must be a positive int, got {value!r}")
        if self.height < 16 or self.width < 16:
            raise InvalidArgumentError(f"ShapeEditConfig needs height and width >= 16, got {self.height}x{self.width}")
        if self.max_objects > len(SHAPES) - 1:
            # "add" and "swap" need a shape that is not in the scene yet.
            raise InvalidArgumentError(f"ShapeEditConfig.max_objects must be <= {len(SHAPES) - 1}, got {self.max_objects}")
        if self.min_objects > self.max_objects:
            raise InvalidArgumentError("ShapeEditConfig.min_objects must be <= max_objects")
        if not 0 <= self.min_speed <= self.max_speed:
            raise InvalidArgumentError("ShapeEditConfig needs 0 <= min_speed <= max_speed")

    def family_of(self, seed: int) -> str:
        """The edit family of a seed drawn without one (see family_weights)."""
        return _option_at(FAMILIES, self.family_weights, seed % sum(self.family_weights))


def _option_at(options, weights, place: int) -> str:
    """The option whose run covers `place` when option i takes weights[i] consecutive places."""
    for option, weight in zip(options, weights):
        if place < weight:
            return str(option)
        place -= weight
    raise ValueError(f"place {place} is past the {sum(weights)} places of the weights")


@dataclass
class ShapeObject:
    """One shape; position is its centre at frame 0 in pixels, velocity in pixels per frame."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    vx: float
    vy: float


@dataclass
class Scene:
    background_style: str
    background_color: str
    objects: list[ShapeObject] = field(default_factory=list)  # drawn in order: last on top


@dataclass
class ShapeEditExample:
    """One edit pair.

    source, target: uint8 ``[F, H, W, 3]``.
    object_mask: bool ``[F, H, W]``, where the edited thing is visible in the source or the
        target (for ``background``: the background pixels visible in the target).
    edit_mask: bool ``[F, H, W]``, the pixels where target differs from source.
    metadata: JSON-serialisable description (seed, split, scenes, edit parameters).
    """

    source: np.ndarray
    target: np.ndarray
    instruction: str
    family: str
    object_mask: np.ndarray
    edit_mask: np.ndarray
    metadata: dict


# ---------------------------------------------------------------------------------------------
# Rendering


def object_radius(size: str, config: ShapeEditConfig) -> float:
    """An object's radius in pixels."""
    return SIZES[size] * min(config.height, config.width)


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Shape outlines in units of the radius, as tested by `shape_mask` (and the batched renderer).
SQUARE_HALF_SIDE = 0.82
TRIANGLE_DROP = 0.15  # the triangle's centroid sits this far below the object centre
TRIANGLE_POLYGON = np.array([[0.0, -1.0], [np.sqrt(3) / 2, 0.5], [-np.sqrt(3) / 2, 0.5]]) * 1.15
STAR_POLYGON = _star_polygon() * 1.1


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over pixels (``px``, ``py`` broadcast)."""
    inside = np.zeros(np.broadcast_shapes(px.shape, py.shape), dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def shape_mask(shape: str, cx, cy, radius: float, height: int, width: int) -> np.ndarray:
    """bool ``[..., H, W]``: pixels whose centre lies inside the shape centred at ``(cx, cy)``
    (floats, or arrays of one shape ``[...]``, e.g. one centre per frame).

    Every shape is tested per row: ``dx`` depends only on the column and ``dy`` only on the
    row, so the work per pixel is one comparison, with the same float64 values as testing each
    pixel on its own.
    """
    cx = np.asarray(cx, dtype=np.float64)[..., None]
    cy = np.asarray(cy, dtype=np.float64)[..., None]
    dx = ((np.arange(width, dtype=np.float64) + 0.5 - cx) / radius)[..., None, :]  # [..., 1, W]
    dy = ((np.arange(height, dtype=np.float64) + 0.5 - cy) / radius)[..., :, None]  # [..., H, 1]
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":  # max(|dx|, |dy|) <= side, about the circle's area
        return (np.abs(dx) <= SQUARE_HALF_SIDE) & (np.abs(dy) <= SQUARE_HALF_SIDE)
    if shape == "triangle":
        return _inside_polygon(dx, dy - TRIANGLE_DROP, TRIANGLE_POLYGON)
    if shape == "star":
        return _inside_polygon(dx, dy, STAR_POLYGON)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=256)
def render_background(style: str, color: str, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]``, read-only (cached); fully determined by (style, colour) so a background
    edit is exact."""
    if color not in BACKGROUND_COLORS:
        raise ValueError(f"unknown background colour {color!r}")
    base = np.array(BACKGROUND_COLORS[color], dtype=np.float64)
    light = base + 0.45 * (255 - base) * 0.5
    ys, xs = np.mgrid[0:height, 0:width]
    period = max(4, min(height, width) // 8)
    if style == "solid":
        weight = np.zeros((height, width))
    elif style == "gradient":
        weight = ys / max(1, height - 1)
    elif style == "stripes":
        weight = (((xs + ys) // period) % 2).astype(np.float64)
    elif style == "checkerboard":
        weight = (((xs // period) + (ys // period)) % 2).astype(np.float64)
    else:
        raise ValueError(f"unknown background style {style!r}; known: {', '.join(BACKGROUND_STYLES)}")
    image = base[None, None] * (1 - weight[..., None]) + light[None, None] * weight[..., None]
    background = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    background.flags.writeable = False
    return background


def bounce_tracks(x, y, vx, vy, radius, config: ShapeEditConfig) -> np.ndarray:
    """float ``[..., F, 2]`` centre positions of objects (arrays ``[...]`` of start centres,
    velocities and radii), bouncing off the frame edges (reflection)."""
    t = np.arange(config.frames)
    radius = np.asarray(radius, dtype=np.float64)[..., None]
    axes = []
    for p0, v, extent in ((x, vx, config.width), (y, vy, config.height)):
        p0 = np.asarray(p0, dtype=np.float64)[..., None]
        v = np.asarray(v, dtype=np.float64)[..., None]
        lo, hi = radius, extent - radius
        span = hi - lo
        # Unfold the bounces: move freely on a line, then fold into [lo, hi] with period 2*span.
        free = (p0 - lo) + v * t
        with np.errstate(divide="ignore", invalid="ignore"):  # span <= 0: centred, below
            folded = np.mod(free, 2 * span)
        position = lo + np.where(folded > span, 2 * span - folded, folded)
        axes.append(np.where(span > 0, position, extent / 2))
    return np.stack(axes, axis=-1)


def object_track(obj: ShapeObject, config: ShapeEditConfig) -> np.ndarray:
    """float ``[F, 2]`` centre positions, bouncing off the frame edges (reflection)."""
    return bounce_tracks(obj.x, obj.y, obj.vx, obj.vy, object_radius(obj.size, config), config)


def render_scene(scene: Scene, config: ShapeEditConfig) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene: video uint8 ``[F, H, W, 3]`` and an id map int8 ``[F, H, W]`` holding the
    index of the visible object per pixel (-1 = background)."""
    F, H, W = config.frames, config.height, config.width
    background = render_background(scene.background_style, scene.background_color, H, W)
    video = np.broadcast_to(background, (F, H, W, 3)).copy()
    ids = np.full((F, H, W), -1, dtype=np.int8)
    for index, obj in enumerate(scene.objects):
        track = object_track(obj, config)
        mask = shape_mask(obj.shape, track[:, 0], track[:, 1], object_radius(obj.size, config), H, W)
        video[mask] = OBJECT_COLORS[obj.color]
        np.copyto(ids, np.int8(index), where=mask)  # faster than ids[mask] = index
    return video, ids


def interior_mask(video: np.ndarray, tolerance: int = EDGE_TOLERANCE) -> np.ndarray:
    """bool ``[F, H, W]``: pixels whose 3x3 neighbourhood (edge-padded) spans at most
    ``tolerance`` per channel: not on a shape or texture edge (smooth gradients count)."""
    padded = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows_max = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    rows_min = np.minimum(np.minimum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    high = np.maximum(np.maximum(rows_max[:, :, :-2], rows_max[:, :, 1:-1]), rows_max[:, :, 2:])
    low = np.minimum(np.minimum(rows_min[:, :, :-2], rows_min[:, :, 1:-1]), rows_min[:, :, 2:])
    flat = high - low <= tolerance
    return flat[..., 0] & flat[..., 1] & flat[..., 2]  # np.all over an axis of 3 is far slower


# ---------------------------------------------------------------------------------------------
# Scenes and edits


def _pick(rng, options) -> str:
    """One of ``options``, uniformly: the same draw as ``rng.choice(options)`` without building an
    array (a third of the time spent drawing a scene)."""
    options = list(options)
    return str(options[int(rng.integers(len(options)))])


def _pick_weighted(rng, options, weights) -> str:
    """One of ``options`` with probability proportional to ``weights``; with equal weights of 1, the
    same draw as `_pick`."""
    return _option_at(options, weights, int(rng.integers(sum(weights))))


def _random_object(rng, shape, color, config: ShapeEditConfig) -> ShapeObject:
    size = _pick(rng, SIZES)
    r = object_radius(size, config)
    unit = min(config.height, config.width)
    speed = rng.uniform(config.min_speed, config.max_speed) * unit
    angle = rng.uniform(0, 2 * np.pi)
    return ShapeObject(
        shape=shape,
        color=color,
        size=size,
        x=float(rng.uniform(r, config.width - r)),
        y=float(rng.uniform(r, config.height - r)),
        vx=float(speed * np.cos(angle)),
        vy=float(speed * np.sin(angle)),
    )


def _random_scene(rng, config: ShapeEditConfig) -> Scene:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = rng.permutation(SHAPES)[:count]
    colors = rng.permutation(list(OBJECT_COLORS))[:count]
    return Scene(
        background_style=_pick(rng, BACKGROUND_STYLES),
        background_color=_pick(rng, BACKGROUND_COLORS),
        objects=[_random_object(rng, str(s), str(c), config) for s, c in zip(shapes, colors)],
    )


def _name(obj: ShapeObject) -> str:
    return f"the {obj.color} {obj.shape}"


def _apply_edit(rng, family: str, source: Scene, config: ShapeEditConfig):
    """Return (target scene, instruction, edited object index in source, index in target, params)."""
    target = replace(source, objects=[replace(o) for o in source.objects])
    used_shapes = {o.shape for o in source.objects}
    used_colors = {o.color for o in source.objects}
    index = int(rng.integers(len(source.objects)))
    obj = source.objects[index]
    fields = {"obj": _name(obj)}

    if family == "swap":
        shape = _pick(rng, [s for s in SHAPES if s not in used_shapes])
        target.objects[index].shape = shape
        fields.update(shape=shape, color=obj.color)
        params = {"object": index, "shape": shape}
        src_index, tgt_index = index, index
    elif family == "recolor":
        color = _pick(rng, [c for c in OBJECT_COLORS if c not in used_colors])
        target.objects[index].color = color
        fields.update(color=color)
        params = {"object": index, "color": color}
        src_index, tgt_index = index, index
    elif family == "add":
        shape = _pick(rng, [s for s in SHAPES if s not in used_shapes])
        color = _pick(rng, [c for c in OBJECT_COLORS if c not in used_colors])
        size = _pick(rng, SIZES)
        place = _pick(rng, PLACES)
        fx, fy = PLACES[place]
        target.objects.append(ShapeObject(shape, color, size, fx * config.width, fy * config.height, 0.0, 0.0))
        fields.update(shape=shape, color=color, size=size, place=place)
        params = {"shape": shape, "color": color, "size": size, "place": place}
        src_index, tgt_index = None, len(target.objects) - 1
    elif family == "remove":
        del target.objects[index]
        params = {"object": index}
        src_index, tgt_index = index, None
    elif family == "background":
        choices = [
            (s, c)
            for s in BACKGROUND_STYLES
            for c in BACKGROUND_COLORS
            if c != source.background_color  # a new colour keeps every background edit clearly visible
        ]
        style, color = choices[int(rng.integers(len(choices)))]
        target.background_style, target.background_color = style, color
        phrase = _pick(rng, BACKGROUND_PHRASES[style]).format(color=color)
        fields.update(bg=phrase)
        params = {"style": style, "color": color}
        src_index, tgt_index = None, None
    elif family == "motion":
        motion = _pick_weighted(rng, MOTIONS, config.motion_weights)
        moved = target.objects[index]
        speed = float(np.hypot(obj.vx, obj.vy))
        if motion == "reverse":
            moved.vx, moved.vy = -obj.vx, -obj.vy
        elif motion == "stop":
            moved.vx, moved.vy = 0.0, 0.0
        elif motion == "faster":
            moved.vx, moved.vy = 2 * obj.vx, 2 * obj.vy
        else:
            moved.vx, moved.vy = {"left": (-speed, 0.0), "right": (speed, 0.0), "up": (0.0, -speed), "down": (0.0, speed)}[motion]
        params = {"object": index, "motion": motion}
        src_index, tgt_index = index, index
    else:
        raise InvalidArgumentError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
    templates = TEMPLATES["motion"][params["motion"]] if family == "motion" else TEMPLATES[family]
    instruction = _pick(rng, templates).format(**fields)
    return target, instruction, src_index, tgt_index, params


MAX_ATTEMPTS = 100  # candidate edits per example before giving up (a degenerate config)


@dataclass
class EditDraw:
    """One candidate edit of an example: the scenes before and after, and the words for it.

    ``source_index``/``target_index``: the edited object's position in ``source.objects`` /
    ``target.objects`` (None when the family has none there, e.g. ``add`` in the source).
    """

    family: str
    source: Scene
    target: Scene
    instruction: str
    source_index: int | None
    target_index: int | None
    params: dict


class EditCandidates:
    """The candidate edits of ShapeEdit example ``seed`` of ``split``, in the order every renderer
    tries them: the first whose edit is visible (see `edit_is_visible`) is the example.

    The one place where a seed becomes scene parameters, shared by `generate_example` and the
    batched renderer (`liveditor.data.shapes_batch`), so both draw identical scenes. Its draws
    depend on its arguments only, so a renderer can recreate an example's candidates from its seed.
    ``family=None`` takes ``config.family_of(seed)`` (by default ``FAMILIES[seed % 6]``), so
    consecutive seeds cycle through the families.
    """

    def __init__(self, seed: int, split: str = "train", family: str | None = None, config: ShapeEditConfig | None = None):
        if split not in SPLITS:
            raise InvalidArgumentError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        seed = int(seed)
        config = ShapeEditConfig() if config is None else config
        if family is None:
            family = config.family_of(seed)
        elif family not in FAMILIES:
            raise ValueError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
        self.seed, self.split, self.family = seed, split, family
        self.config = config
        self.attempts = 0  # candidates drawn so far
        self._rng = np.random.default_rng(
            np.random.SeedSequence([SPLITS.index(split), 0x5EED, seed, FAMILIES.index(family)])
        )

    def __iter__(self):
        return self

    def __next__(self) -> EditDraw:
        if self.attempts >= MAX_ATTEMPTS:  # pragma: no cover - needs a degenerate config
            raise LIVEditorError(
                f"could not draw a visible {self.family} edit for seed {self.seed} with {self.config}"
            )
        self.attempts += 1
        scene = _random_scene(self._rng, self.config)
        target, instruction, source_index, target_index, params = _apply_edit(self._rng, self.family, scene, self.config)
        return EditDraw(self.family, scene, target, instruction, source_index, target_index, params)


def changed_pixels(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """bool ``[F, H, W]``: where two videos differ in any channel."""
    differ = source != target
    return differ[..., 0] | differ[..., 1] | differ[..., 2]  # np.any over an axis of 3 is far slower


def edit_is_visible(edit_mask: np.ndarray, target: np.ndarray) -> bool:
    """Whether an edit changes at least ``MIN_EDIT_PIXELS`` pixels away from edges. An object can
    hide behind another or barely move, or a swap can differ only along the outline: such a
    candidate is redrawn."""
    return int(np.count_nonzero(edit_mask & interior_mask(target))) >= MIN_EDIT_PIXELS


def generate_example(
    seed: int,
    split: str = "train",
    family: str | None = None,
    config: ShapeEditConfig | None = None,
) -> ShapeEditExample:
    """The ShapeEdit example number ``seed`` of ``split``; deterministic.

    ``family=None`` takes ``config.family_of(seed)`` (by default ``FAMILIES[seed % 6]``).
    """
    candidates = EditCandidates(seed, split, family, config)
    config = candidates.config
    for draw in candidates:
        source, source_ids = render_scene(draw.source, config)
        target, target_ids = render_scene(draw.target, config)
        edit_mask = changed_pixels(source, target)
        if edit_is_visible(edit_mask, target):
            break

    if draw.family == "background":
        object_mask = target_ids < 0
    else:
        object_mask = np.zeros(edit_mask.shape, dtype=bool)
        if draw.source_index is not None:
            object_mask |= source_ids == draw.source_index
        if draw.target_index is not None:
            object_mask |= target_ids == draw.target_index
    metadata = {
        "seed": candidates.seed,
        "split": split,
        "family": draw.family,
        "attempts": candidates.attempts,
        "config": asdict(config),
        "source_scene": asdict(draw.source),
        "target_scene": asdict(draw.target),
        "edit": draw.params,
    }
    return ShapeEditExample(
        source=source,
        target=target,
        instruction=draw.instruction,
        family=draw.family,
        object_mask=object_mask,
        edit_mask=edit_mask,
        metadata=metadata,
    )
