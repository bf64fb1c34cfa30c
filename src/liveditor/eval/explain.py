"""What ISA did in one self-attention call of a real edit, as pictures over the input frames.

For one layer at one denoising step (conditional branch) the explanation holds, per head:
- which context blocks survived pre-selection, and the coarse mass the source put on every context
  block (the statistic the selection ranks: the pooled source queries' softmax mass, summed over
  source blocks, divided by their number, so all context blocks together get the source's share of
  coarse attention that went to the context);
- which query blocks went to exact attention and which to the Taylor path (sharpness routing);
- the call's share of dense FLOPs.

Routing is captured through the transformer's per-call attention callback (``ISAInfo``) and the
pipeline's step callback (``ConditionalAttentionProbe``). A block is drawn over the pixels its
tokens cover: token -> (frame, row, column) of the token grid (through ISA's token order) -> the
latent patch -> the pixels of the VAE's spatial and temporal stride.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LIVEditorError
from ..isa import ISAConfig
from ..isa.layout import block_means, tile_permutation
from .activations import ConditionalAttentionProbe, check_indices

EXPLAIN_JSON = "explain.json"
EXPLAIN_VIDEO = "explain.mp4"
PANEL_TITLES = ("context blocks kept (green: coarse mass)", "source queries: exact (red) / Taylor (blue)",
                "context queries: exact (red) / Taylor (blue)")
MIN_PANEL = 192  # pixels; small clips are enlarged (nearest neighbour) to at least this


@dataclass
class ISAExplanation:
    """ISA's decisions in one self-attention call, with what is needed to draw them.

    Arrays are per head: ``selected_context_blocks`` ``[H, n_sel]``, ``exact_query_blocks``
    ``[H, nb]`` (source blocks first, then context blocks), ``context_block_mass`` ``[H, n_ctx]``.
    ``frames``: the input as the model saw it (bucket size, frame count used), uint8 ``[F, H, W, 3]``.
    """

    layer: int
    num_layers: int
    step: int
    num_steps: int
    timestep: float
    grid: tuple[int, int, int]  # tokens of one segment: (frames, rows, columns)
    patch_size: tuple[int, int, int]
    vae_stride: tuple[int, int]  # (temporal, spatial)
    isa_config: ISAConfig
    selected_context_blocks: np.ndarray
    exact_query_blocks: np.ndarray
    context_block_mass: np.ndarray
    num_source_blocks: int
    num_context_blocks: int
    flop_fraction: float
    frames: np.ndarray

    @property
    def num_heads(self) -> int:
        return int(self.exact_query_blocks.shape[0])

    def kept_context(self, head: int | None = None) -> np.ndarray:
        """``[n_ctx]`` share of heads that kept each context block (0 or 1 for one head)."""
        kept = np.zeros((self.num_heads, self.num_context_blocks))
        np.put_along_axis(kept, self.selected_context_blocks, 1.0, axis=1)
        return self._over_heads(kept, head)

    def exact_queries(self, head: int | None = None) -> np.ndarray:
        """``[nb]`` share of heads that routed each query block to exact attention."""
        return self._over_heads(self.exact_query_blocks.astype(np.float64), head)

    def mass(self, head: int | None = None) -> np.ndarray:
        """``[n_ctx]`` coarse mass of each context block (mean over heads, or one head's)."""
        return self._over_heads(self.context_block_mass, head)

    def _over_heads(self, values: np.ndarray, head: int | None) -> np.ndarray:
        if head is None:
            return values.mean(0)
        if not 0 <= head < self.num_heads:
            raise LIVEditorError(f"head must be in [0, {self.num_heads}), got {head}")
        return values[head]

    def summary(self, head: int | None = None) -> dict:
        heads = "mean of all heads" if head is None else f"head {head}"
        return {
            "layer": self.layer, "num_layers": self.num_layers, "step": self.step, "num_steps": self.num_steps,
            "timestep": self.timestep, "branch": "conditional", "heads": heads,
            "num_kept_context_blocks": int(self.selected_context_blocks.shape[1]),
            "num_context_blocks": self.num_context_blocks,
            "num_exact_query_blocks": int(self.exact_query_blocks[0].sum()),
            "num_query_blocks": int(self.exact_query_blocks.shape[1]),
            "flop_fraction": self.flop_fraction,
        }


def context_block_mass(query: torch.Tensor, key: torch.Tensor, num_source: int, grid,
                       config: ISAConfig) -> torch.Tensor:
    """``[B, H, n_ctx]``: coarse softmax mass of the pooled source queries on each pooled context
    key block, averaged over source blocks (ISA's pre-selection ranks context blocks by it)."""
    if config.token_order == "tile":
        order = token_order(num_source, grid, config)
        order = torch.cat([order, order + num_source]).to(query.device)
        query, key = query[:, :, order], key[:, :, order]
    qc, kc = block_means(query, num_source, config.block_size), block_means(key, num_source, config.block_size)
    n_src = -(-num_source // config.block_size)
    probs = torch.softmax((qc @ kc.transpose(-1, -2)) / query.shape[-1] ** 0.5, dim=-1)
    return probs[:, :, :n_src, n_src:].mean(-2)


def token_order(num_tokens: int, grid, config: ISAConfig) -> torch.Tensor:
    """Raster token of every position of one segment in ISA's order (identity for raster order)."""
    if config.token_order == "tile":
        return tile_permutation(*grid, config.tile)
    return torch.arange(num_tokens)


def token_blocks(grid, config: ISAConfig) -> np.ndarray:
    """Block of every token of one segment, ``[frames, rows, columns]`` (block numbers within the segment)."""
    num_tokens = int(np.prod(grid))
    order = token_order(num_tokens, grid, config).numpy()
    blocks = np.empty(num_tokens, dtype=np.int64)
    blocks[order] = np.arange(num_tokens) // config.block_size
    return blocks.reshape(grid)


def pixel_token_frame(pixel_frame: int, temporal_stride: int, temporal_patch: int) -> int:
    """Token frame that covers a pixel frame: the VAE keeps frame 0 alone and folds each following
    run of ``temporal_stride`` frames into one latent frame (Wan's causal 4k+1 rule)."""
    latent = 0 if pixel_frame == 0 else (pixel_frame - 1) // temporal_stride + 1
    return latent // temporal_patch


def pixel_map(token_values: np.ndarray, pixel_frame: int, patch_size, vae_stride) -> np.ndarray:
    """Per-pixel ``[H, W]`` values of one pixel frame from per-token values ``[frames, rows, columns]``."""
    p_t, p_h, p_w = patch_size
    stride_t, stride_s = vae_stride
    frame = token_values[pixel_token_frame(pixel_frame, stride_t, p_t)]
    return np.repeat(np.repeat(frame, p_h * stride_s, axis=0), p_w * stride_s, axis=1)


def model_input_frames(pipe, video, **prepare_kwargs) -> np.ndarray:
    """The input as the pipeline feeds it to the model (bucket size, frames used), uint8 ``[F, H, W, 3]``;
    ``prepare_kwargs``: the call's ``height``, ``width``, ``num_frames``, ``resize_mode``."""
    pixels, _ = pipe.prepare_video(video, **prepare_kwargs)
    frames = ((pixels[0].permute(1, 2, 3, 0).float() + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return frames.numpy()


class ExplainProbe:
    """Captures ISA's decisions at one layer and step of a pipeline call.

    Use ``attention_kwargs={"callback": probe.attention_callback}`` and
    ``callback_on_step_end=probe.step_callback``; after the call, ``probe.explanation(pipe, video)``.
    """

    def __init__(self, pipe, layer: int | None = None, step: int | None = None, num_steps: int | None = None):
        self.num_layers = len(pipe.transformer.blocks)
        self.num_steps, _ = pipe.sampling_settings(num_steps)
        self.layer = self.num_layers // 2 if layer is None else check_indices("layer", [layer], self.num_layers)[0]
        self.step = self.num_steps // 2 if step is None else check_indices("step", [step], self.num_steps)[0]
        self.isa_config = pipe.transformer.isa_config
        self._captured = None
        self._probe = ConditionalAttentionProbe([self.layer], [self.step], self._capture)

    @property
    def attention_callback(self):
        return self._probe.attention_callback

    @property
    def step_callback(self):
        return self._probe.step_callback

    @property
    def captured(self) -> bool:
        return self._captured is not None

    def _capture(self, event, step: int) -> None:
        if self._captured is not None:  # a windowed edit: the first window is explained
            return
        if event.info is None:
            raise LIVEditorError("explain shows ISA's routing; this edit ran with dense attention")
        if event.query.shape[0] != 1:
            raise LIVEditorError(f"explain draws one video; the call has a batch of {event.query.shape[0]}")
        config = self.isa_config
        mass = context_block_mass(event.query.float(), event.key.float(), event.num_source, event.grid, config)
        self._captured = (event, mass[0].cpu().numpy())

    def explanation(self, pipe, video, **prepare_kwargs) -> ISAExplanation:
        """The captured call as an ISAExplanation; ``video`` and ``prepare_kwargs`` (``height``,
        ``width``, ``num_frames``, ``resize_mode``): the call's input, drawn under the blocks."""
        if self._captured is None:
            raise LIVEditorError(f"no self-attention call of layer {self.layer} at step {self.step} was seen")
        event, mass = self._captured
        info = event.info
        return ISAExplanation(
            layer=self.layer,
            num_layers=self.num_layers,
            step=self.step,
            num_steps=self.num_steps,
            timestep=self._probe.timesteps[self.step] if len(self._probe.timesteps) > self.step else float("nan"),
            grid=tuple(event.grid),
            patch_size=tuple(int(p) for p in pipe.transformer.config.patch_size),
            vae_stride=(pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial),
            isa_config=self.isa_config,
            selected_context_blocks=info.selected_context_blocks[0].cpu().numpy(),
            exact_query_blocks=info.exact_query_blocks[0].cpu().numpy(),
            context_block_mass=mass,
            num_source_blocks=info.num_source_blocks,
            num_context_blocks=info.num_context_blocks,
            flop_fraction=float(info.flop_fraction),
            frames=model_input_frames(pipe, video, **prepare_kwargs),
        )


def explain_edit(pipe, video, instruction: str, layer: int | None = None, step: int | None = None,
                 **call_kwargs) -> ISAExplanation:
    """Run the edit up to ``step`` and explain ISA's routing at ``layer`` (defaults: the middle
    layer at the middle step). The call stops after that step (the pipeline's ``interrupt``)."""
    probe = ExplainProbe(pipe, layer, step, call_kwargs.get("num_inference_steps"))

    def stop_after_capture(pipe_, step_, timestep, callback_kwargs):
        probe.step_callback(pipe_, step_, timestep, callback_kwargs)
        if probe.captured:
            pipe_._interrupt = True
        return {}

    attention_kwargs = {**(call_kwargs.pop("attention_kwargs", None) or {}), "callback": probe.attention_callback}
    call_kwargs["output_type"] = "latent"
    pipe(video, instruction, attention_kwargs=attention_kwargs, callback_on_step_end=stop_after_capture, **call_kwargs)
    prepare = {k: call_kwargs[k] for k in ("height", "width", "num_frames", "resize_mode") if k in call_kwargs}
    return probe.explanation(pipe, video, **prepare)


# ----- drawing ----------------------------------------------------------------------------------

_RED = np.array([230.0, 40.0, 40.0])
_BLUE = np.array([40.0, 90.0, 230.0])
_GREEN = np.array([40.0, 220.0, 60.0])


def _block_edges(blocks: np.ndarray) -> np.ndarray:
    """Pixels on the boundary between two blocks (right or lower neighbour differs)."""
    edge = np.zeros(blocks.shape, dtype=bool)
    edge[:, :-1] |= blocks[:, 1:] != blocks[:, :-1]
    edge[:-1, :] |= blocks[1:, :] != blocks[:-1, :]
    return edge


def _block_bar(colours: np.ndarray, heights: np.ndarray, here: np.ndarray, width: int, height: int) -> np.ndarray:
    """The whole segment as one row of blocks (sequence order): block j a column of ``colours[j]``
    filled to ``heights[j]`` (0..1) of the bar, with a black mark under the blocks in ``here``."""
    n = len(colours)
    bar = np.full((height, n, 3), 255.0)
    mark = max(1, height // 6)
    filled = np.arange(height - mark)[::-1, None] < np.ceil(heights[None, :] * (height - mark))
    bar[: height - mark][filled] = np.broadcast_to(colours[None], (height - mark, n, 3))[filled]
    bar[height - mark:, here] = 0.0
    columns = np.minimum((np.arange(width) * n) // width, n - 1)
    return bar[:, columns]


def render_frames(expl: ISAExplanation, head: int | None = None, scale: int | None = None) -> list:
    """One PIL image per input frame: three panels (context kept with coarse mass; source query
    routing; context query routing) over the frame, with block outlines; under each panel the whole
    segment's blocks as a bar (blocks of this frame marked); a caption."""
    from PIL import Image, ImageDraw, ImageFont

    frames = expl.frames.astype(np.float64)
    num_frames, height, width, _ = frames.shape
    if scale is None:
        scale = max(1, -(-MIN_PANEL // min(height, width)))
    blocks = token_blocks(expl.grid, expl.isa_config)
    kept_blocks = expl.kept_context(head)
    mass = expl.mass(head)
    mass_blocks = mass / mass.max() if mass.max() > 0 else mass
    exact = expl.exact_queries(head)
    routing_blocks = (exact[: expl.num_source_blocks], exact[expl.num_source_blocks:])
    kept, mass_shown = kept_blocks[blocks], mass_blocks[blocks]
    exact_source, exact_context = (r[blocks] for r in routing_blocks)
    gray_rgb = np.array([170.0, 170.0, 170.0])
    bar_colours = [kept_blocks[:, None] * _GREEN + (1 - kept_blocks[:, None]) * gray_rgb]
    bar_colours += [r[:, None] * _RED + (1 - r[:, None]) * _BLUE for r in routing_blocks]
    bar_heights = [mass_blocks, np.ones(len(routing_blocks[0])), np.ones(len(routing_blocks[1]))]
    args = (expl.patch_size, expl.vae_stride)

    summary = expl.summary(head)
    font = ImageFont.load_default(size=max(10, 4 * scale))
    caption = [
        f"layer {summary['layer']} of 0..{summary['num_layers'] - 1}, step {summary['step']} of "
        f"0..{summary['num_steps'] - 1} "
        f"(t={summary['timestep']:.0f}), conditional branch, {summary['heads']}",
        f"context blocks kept {summary['num_kept_context_blocks']}/{summary['num_context_blocks']}, exact query "
        f"blocks {summary['num_exact_query_blocks']}/{summary['num_query_blocks']}, "
        f"FLOPs {100 * summary['flop_fraction']:.1f}% of dense",
    ]
    gap, title_h = 2 * scale, 6 * scale
    line_h = int(font.size * 1.3)
    panel_w, panel_h = width * scale, height * scale
    canvas_w = 3 * panel_w + 4 * gap
    canvas_w += canvas_w % 2
    bar_h = 10 * scale
    canvas_h = title_h + panel_h + bar_h + 3 * gap + line_h * (len(caption) + 1)
    canvas_h += canvas_h % 2

    images = []
    for f in range(num_frames):
        rgb = frames[f]
        gray = rgb.mean(-1, keepdims=True).repeat(3, -1)
        k, m = pixel_map(kept, f, *args)[..., None], pixel_map(mass_shown, f, *args)[..., None]
        panel_kept = rgb * (0.3 + 0.7 * k)
        panel_kept = panel_kept * (1 - 0.45 * m) + _GREEN * 0.45 * m
        panels = [panel_kept]
        for routing in (exact_source, exact_context):
            e = pixel_map(routing, f, *args)[..., None]
            panels.append(gray * 0.5 + (e * _RED + (1 - e) * _BLUE) * 0.5)
        block_map = pixel_map(blocks, f, *args)
        edges = _block_edges(block_map)
        here = np.unique(block_map)
        canvas = Image.new("RGB", (canvas_w, canvas_h), "white")
        draw = ImageDraw.Draw(canvas)
        for i, panel in enumerate(panels):
            panel = np.clip(panel, 0, 255)
            panel[edges] = 255.0
            tile = Image.fromarray(panel.astype(np.uint8)).resize((panel_w, panel_h), Image.NEAREST)
            x = gap + i * (panel_w + gap)
            canvas.paste(tile, (x, title_h))
            draw.text((x, 0), PANEL_TITLES[i], fill="black", font=ImageFont.load_default(size=max(8, 3 * scale)))
            bar = _block_bar(bar_colours[i], bar_heights[i], here, panel_w, bar_h)
            canvas.paste(Image.fromarray(bar.astype(np.uint8)), (x, title_h + panel_h + gap))
        y = title_h + panel_h + bar_h + 2 * gap
        for text in caption + [f"input frame {f + 1}/{num_frames}; bars: all blocks in sequence order, "
                               "this frame's marked"]:
            draw.text((gap, y), text, fill="black", font=font)
            y += line_h
        images.append(canvas)
    return images


def check_explain_folder(folder, overwrite: bool = False) -> Path:
    """Raise a one-line LIVEditorError unless explanation files may be written into ``folder``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LIVEditorError(f"explain folder {folder} is not a folder")
    if not overwrite and folder.is_dir():
        existing = sorted(folder.glob("frame_*.png")) + [folder / n for n in (EXPLAIN_VIDEO, EXPLAIN_JSON)]
        existing = [p for p in existing if p.exists()]
        if existing:
            raise LIVEditorError(f"explain folder {folder} already holds {existing[0].name}; choose another folder "
                                 "or overwrite")
    return folder


def write_explanation(expl: ISAExplanation, folder, head: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``frame_NNN.png`` per input frame, ``explain.mp4`` (the frames as a short clip) and
    ``explain.json`` (the numbers) into ``folder``; every file atomically. Returns the paths."""
    from ..atomic import atomic_output, write_json
    from ..data.video_io import write_video

    folder = check_explain_folder(folder, overwrite)
    images = render_frames(expl, head)
    names = [f"frame_{i:03d}.png" for i in range(len(images))] + [EXPLAIN_VIDEO, EXPLAIN_JSON]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in zip(names, images):
        with atomic_output(folder / name) as handle:
            image.save(handle, format="PNG")
        paths.append(folder / name)
    fps = max(1.0, min(8.0, len(images) / 4.0))  # a few seconds whatever the clip's length
    clip = np.stack([np.asarray(image) for image in images])
    paths.append(write_video(folder / EXPLAIN_VIDEO, clip, fps=fps, overwrite=True))
    record = {
        **expl.summary(head),
        "grid": list(expl.grid), "patch_size": list(expl.patch_size), "vae_stride": list(expl.vae_stride),
        "isa_config": asdict(expl.isa_config),
        "selected_context_blocks": expl.selected_context_blocks.tolist(),
        "exact_query_blocks": expl.exact_query_blocks.astype(int).tolist(),
        "context_block_mass": expl.context_block_mass.tolist(),
    }
    write_json(folder / EXPLAIN_JSON, record)
    paths.append(folder / EXPLAIN_JSON)
    return paths


def explain_video_edit(input_path, instruction: str, folder, model=None, edit_attention: str = "isa",
                       steps: int | None = None, guidance: float | None = None, seed: int = 42,
                       window: int | None = None, start: float = 0.0, duration: float | None = None,
                       resize: str = "crop", negative_prompt: str | None = None, device: str | None = None,
                       offload: bool = False, overwrite: bool = False) -> list[Path]:
    """``liveditor edit ... --explain DIR``: the edit's first window, with the same settings and seed,
    run with ISA attention up to the middle step (the same routing as the edit when it ran ISA; an
    edit that ran dense, ``edit_attention="dense"``, is explained as ISA would route it, and the line
    says so); ISA's routing at the middle layer written into ``folder``. ``seed``: the seed the edit
    used."""
    from ..data.video_io import read_video
    from ..pipelines.loading import load_pipeline

    check_explain_folder(folder, overwrite)
    pipe = load_pipeline(model, device=device, offload=offload, vae_tiling=offload)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.set_attention_mode("isa")
    clip = read_video(input_path, max_frames=window or pipe.config.max_num_frames, fps=pipe.config.fps,
                      start=start, duration=duration)
    expl = explain_edit(pipe, clip.frames, instruction, num_inference_steps=steps, guidance_scale=guidance,
                        negative_prompt=negative_prompt, seed=seed, resize_mode=resize)
    paths = write_explanation(expl, folder, overwrite=overwrite)
    ran_dense = " (the edit ran dense attention: this is the routing ISA takes on it)"
    print(f"wrote the ISA explanation of layer {expl.layer}, step {expl.step} ({len(paths) - 2} frames, "
          f"{EXPLAIN_VIDEO}, {EXPLAIN_JSON}) to {folder}" + (ran_dense if edit_attention == "dense" else ""))
    return paths
