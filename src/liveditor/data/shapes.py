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

import copy
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import LIVEditorError

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

    def __post_init__(self):
        for name in ("frames", "height", "width", "min_objects", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ShapeEditConfig.{name} must be a positive int, got {value!r}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"ShapeEditConfig needs height and width >= 16, got {self.height}x{self.width}")
        if self.max_objects > len(SHAPES) - 1:
            # "add" and "swap" need a shape that is not in the scene yet.
            raise ValueError(f"ShapeEditConfig.max_objects must be <= {len(SHAPES) - 1}, got {self.max_objects}")
        if self.min_objects > self.max_objects:
            raise ValueError("ShapeEditConfig.min_objects must be <= max_objects")
        if not 0 <= self.min_speed <= self.max_speed:
            raise ValueError("ShapeEditConfig needs 0 <= min_speed <= max_speed")


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


def _radius(size: str, config: ShapeEditConfig) -> float:
    return SIZES[size] * min(config.height, config.width)


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = np.array([[0.0, -1.0], [np.sqrt(3) / 2, 0.5], [-np.sqrt(3) / 2, 0.5]])
_STAR = _star_polygon()


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over pixels."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def shape_mask(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """bool ``[H, W]``: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx = (xs + 0.5 - cx) / radius
    dy = (ys + 0.5 - cy) / radius
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82  # about the circle's area
    if shape == "triangle":
        return _inside_polygon(dx, dy - 0.15, _TRIANGLE * 1.15)
    if shape == "star":
        return _inside_polygon(dx, dy, _STAR * 1.1)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_background(style: str, color: str, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]``; fully determined by (style, colour) so a background edit is exact."""
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
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def object_track(obj: ShapeObject, config: ShapeEditConfig) -> np.ndarray:
    """float ``[F, 2]`` centre positions, bouncing off the frame edges (reflection)."""
    r = _radius(obj.size, config)
    out = np.empty((config.frames, 2))
    for axis, (p0, v, extent) in enumerate(((obj.x, obj.vx, config.width), (obj.y, obj.vy, config.height))):
        lo, hi = r, extent - r
        span = hi - lo
        t = np.arange(config.frames)
        if span <= 0:
            out[:, axis] = extent / 2
            continue
        # Unfold the bounces: move freely on a line, then fold into [lo, hi] with period 2*span.
        free = (p0 - lo) + v * t
        folded = np.mod(free, 2 * span)
        out[:, axis] = lo + np.where(folded > span, 2 * span - folded, folded)
    return out


def render_scene(scene: Scene, config: ShapeEditConfig) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene: video uint8 ``[F, H, W, 3]`` and an id map int8 ``[F, H, W]`` holding the
    index of the visible object per pixel (-1 = background)."""
    F, H, W = config.frames, config.height, config.width
    background = render_background(scene.background_style, scene.background_color, H, W)
    video = np.broadcast_to(background, (F, H, W, 3)).copy()
    ids = np.full((F, H, W), -1, dtype=np.int8)
    for index, obj in enumerate(scene.objects):
        track = object_track(obj, config)
        color = np.array(OBJECT_COLORS[obj.color], dtype=np.uint8)
        r = _radius(obj.size, config)
        for f in range(F):
            m = shape_mask(obj.shape, track[f, 0], track[f, 1], r, H, W)
            video[f][m] = color
            ids[f][m] = index
    return video, ids


def interior_mask(video: np.ndarray, tolerance: int = 8) -> np.ndarray:
    """bool ``[F, H, W]``: pixels whose 3x3 neighbourhood (edge-padded) spans at most
    ``tolerance`` per channel: not on a shape or texture edge (smooth gradients count)."""
    padded = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows_max = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    rows_min = np.minimum(np.minimum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    high = np.maximum(np.maximum(rows_max[:, :, :-2], rows_max[:, :, 1:-1]), rows_max[:, :, 2:])
    low = np.minimum(np.minimum(rows_min[:, :, :-2], rows_min[:, :, 1:-1]), rows_min[:, :, 2:])
    return np.all(high - low <= tolerance, axis=-1)


# ---------------------------------------------------------------------------------------------
# Scenes and edits


def _random_object(rng, shape, color, config: ShapeEditConfig) -> ShapeObject:
    size = str(rng.choice(list(SIZES)))
    r = _radius(size, config)
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
        background_style=str(rng.choice(BACKGROUND_STYLES)),
        background_color=str(rng.choice(list(BACKGROUND_COLORS))),
        objects=[_random_object(rng, str(s), str(c), config) for s, c in zip(shapes, colors)],
    )


def _name(obj: ShapeObject) -> str:
    return f"the {obj.color} {obj.shape}"


def _apply_edit(rng, family: str, source: Scene, config: ShapeEditConfig):
    """Return (target scene, instruction, edited object index in source, index in target, params)."""
    target = copy.deepcopy(source)
    used_shapes = {o.shape for o in source.objects}
    used_colors = {o.color for o in source.objects}
    index = int(rng.integers(len(source.objects)))
    obj = source.objects[index]
    fields = {"obj": _name(obj)}

    if family == "swap":
        shape = str(rng.choice([s for s in SHAPES if s not in used_shapes]))
        target.objects[index].shape = shape
        fields.update(shape=shape, color=obj.color)
        params = {"object": index, "shape": shape}
        src_index, tgt_index = index, index
    elif family == "recolor":
        color = str(rng.choice([c for c in OBJECT_COLORS if c not in used_colors]))
        target.objects[index].color = color
        fields.update(color=color)
        params = {"object": index, "color": color}
        src_index, tgt_index = index, index
    elif family == "add":
        shape = str(rng.choice([s for s in SHAPES if s not in used_shapes]))
        color = str(rng.choice([c for c in OBJECT_COLORS if c not in used_colors]))
        size = str(rng.choice(list(SIZES)))
        place = str(rng.choice(list(PLACES)))
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
        phrase = str(rng.choice(BACKGROUND_PHRASES[style])).format(color=color)
        fields.update(bg=phrase)
        params = {"style": style, "color": color}
        src_index, tgt_index = None, None
    elif family == "motion":
        motion = str(rng.choice(MOTIONS))
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
        raise ValueError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
    templates = TEMPLATES["motion"][params["motion"]] if family == "motion" else TEMPLATES[family]
    instruction = str(rng.choice(templates)).format(**fields)
    return target, instruction, src_index, tgt_index, params


def generate_example(
    seed: int,
    split: str = "train",
    family: str | None = None,
    config: ShapeEditConfig | None = None,
) -> ShapeEditExample:
    """The ShapeEdit example number ``seed`` of ``split``; deterministic.

    ``family=None`` takes ``FAMILIES[seed % 6]`` so consecutive seeds cycle through the families.
    """
    config = ShapeEditConfig() if config is None else config
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if family is None:
        family = FAMILIES[seed % len(FAMILIES)]
    elif family not in FAMILIES:
        raise ValueError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
    rng = np.random.default_rng(np.random.SeedSequence([SPLITS.index(split), 0x5EED, seed, FAMILIES.index(family)]))

    # Redraw until the edit is visible away from edges (an object can hide behind another, barely
    # move, or a swap can differ only along the outline).
    for attempt in range(100):
        scene = _random_scene(rng, config)
        target_scene, instruction, src_index, tgt_index, params = _apply_edit(rng, family, scene, config)
        source, source_ids = render_scene(scene, config)
        target, target_ids = render_scene(target_scene, config)
        edit_mask = np.any(source != target, axis=-1)
        if (edit_mask & interior_mask(target)).sum() >= MIN_EDIT_PIXELS:
            break
    else:  # pragma: no cover - needs a degenerate config
        raise LIVEditorError(f"could not draw a visible {family} edit for seed {seed} with {config}")

    if family == "background":
        object_mask = target_ids < 0
    else:
        object_mask = np.zeros(edit_mask.shape, dtype=bool)
        if src_index is not None:
            object_mask |= source_ids == src_index
        if tgt_index is not None:
            object_mask |= target_ids == tgt_index
    metadata = {
        "seed": seed,
        "split": split,
        "family": family,
        "attempts": attempt + 1,
        "config": asdict(config),
        "source_scene": asdict(scene),
        "target_scene": asdict(target_scene),
        "edit": params,
    }
    return ShapeEditExample(
        source=source,
        target=target,
        instruction=instruction,
        family=family,
        object_mask=object_mask,
        edit_mask=edit_mask,
        metadata=metadata,
    )
