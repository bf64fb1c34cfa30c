import json

import numpy as np
import pytest

from liveditor.data.shapes import ShapeEditConfig, generate_example
from liveditor.data.video_io import read_video
from liveditor.errors import LIVEditorError
from liveditor.eval.activations import record_attention
from liveditor.eval.explain import (
    EXPLAIN_JSON,
    EXPLAIN_VIDEO,
    ISAExplanation,
    explain_edit,
    pixel_map,
    render_frames,
    token_blocks,
    write_explanation,
)
from liveditor.isa import ISAConfig, isa_attention

CONFIG = ShapeEditConfig(frames=8, height=32, width=32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raster_block_of_a_14b_frame_covers_two_latent_rows_of_pixels(seed):
    # LIVEditor-14B at 544x960: Wan VAE stride (4 frames, 8 pixels), patch (1, 2, 2) -> 34 x 60 tokens a frame.
    grid, patch, stride = (3, 34, 60), (1, 2, 2), (4, 8)
    blocks = token_blocks(grid, ISAConfig())
    rng = np.random.default_rng(seed)
    for pixel_frame in rng.integers(0, 9, size=4):
        shown = pixel_map(blocks, int(pixel_frame), patch, stride)
        assert shown.shape == (544, 960), f"seed {seed}"
        token_frame = 0 if pixel_frame == 0 else (pixel_frame - 1) // 4 + 1
        ys, xs = rng.integers(0, 544, size=50), rng.integers(0, 960, size=50)
        expected = ((token_frame * 34 + ys // 16) * 60 + xs // 16) // 64
        np.testing.assert_array_equal(shown[ys, xs], expected, err_msg=f"seed {seed}, frame {pixel_frame}")
    # 64 tokens of a 60-token row: a strip of about two latent rows (32 pixel rows) across the frame.
    rows = np.nonzero((pixel_map(blocks, 0, patch, stride) == 5).any(1))[0]
    assert (rows.min(), rows.max()) == (5 * 64 // 60 * 16, (6 * 64 - 1) // 60 * 16 + 15)  # pixel rows 80..111


def test_tile_order_blocks_are_square_tiles_of_pixels():
    grid = (2, 16, 16)
    blocks = token_blocks(grid, ISAConfig(token_order="tile", tile=(1, 8, 8)))
    shown = pixel_map(blocks, 1, (1, 2, 2), (1, 8))  # a tile of 8x8 tokens = 128x128 pixels
    assert shown.shape == (256, 256)
    for i in range(2):
        for j in range(2):
            square = shown[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            assert (square == square[0, 0]).all()
    assert sorted(np.unique(shown)) == [4, 5, 6, 7]  # frame 1 holds the second four tiles


@pytest.mark.parametrize("seed", [4, 93])
def test_explanation_is_the_routing_isa_computes_on_that_call(shapeedit_pipeline, seed):
    pipe = shapeedit_pipeline
    config = ISAConfig(block_size=8, select_ratio=0.5)
    pipe.transformer.set_attention_mode("isa", config)
    ex = generate_example(seed, "test", config=CONFIG)
    forwards = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        expl = explain_edit(pipe, ex.source, ex.instruction, layer=1, step=1, num_inference_steps=4,
                            guidance_scale=3.0, seed=seed)
    finally:
        hook.remove()
    assert len(forwards) == 2 * 2, f"seed {seed}: the edit must stop after the explained step"
    (record,) = record_attention(pipe, ex.source, ex.instruction, layers=[1], steps=[1], num_inference_steps=4,
                                 guidance_scale=3.0, seed=seed, output_type="latent")
    _, info = isa_attention(record.q, record.k, record.v, record.num_source, config, gate=record.gate,
                            grid=record.grid, return_info=True)
    assert (expl.layer, expl.step, expl.num_steps) == (1, 1, 4)
    np.testing.assert_array_equal(expl.selected_context_blocks, info.selected_context_blocks[0].numpy())
    np.testing.assert_array_equal(expl.exact_query_blocks, info.exact_query_blocks[0].numpy())
    assert expl.flop_fraction == pytest.approx(info.flop_fraction)
    # Pre-selection keeps the context blocks with the largest coarse mass.
    top = np.sort(np.argsort(-expl.context_block_mass, axis=1)[:, :2], axis=1)
    np.testing.assert_array_equal(top, expl.selected_context_blocks, err_msg=f"seed {seed}")
    assert ((expl.context_block_mass > 0) & (expl.context_block_mass < 1)).all()
    assert expl.frames.shape == (8, 32, 32, 3) and expl.frames.dtype == np.uint8
    assert np.abs(expl.frames.astype(int) - ex.source.astype(int)).mean() < 3  # the input, as the model saw it


def test_explain_rejects_dense_attention_and_bad_indices(shapeedit_pipeline):
    pipe = shapeedit_pipeline
    ex = generate_example(8, "test", config=CONFIG)
    with pytest.raises(ValueError, match="layer"):
        explain_edit(pipe, ex.source, ex.instruction, layer=99, num_inference_steps=2)
    with pytest.raises(ValueError, match="step"):
        explain_edit(pipe, ex.source, ex.instruction, step=2, num_inference_steps=2)
    pipe.transformer.set_attention_mode("dense")
    with pytest.raises(LIVEditorError, match="dense"):
        explain_edit(pipe, ex.source, ex.instruction, num_inference_steps=2)


def _hand_made_explanation(seed: int) -> ISAExplanation:
    """Two 8x8 frames, one 4-token block per frame and segment (grid (2, 2, 2), codec stride 4),
    two heads; context block 1 kept by both heads, block 0 by none."""
    rng = np.random.default_rng(seed)
    return ISAExplanation(
        layer=0, num_layers=1, step=0, num_steps=1, timestep=999.0, grid=(2, 2, 2), patch_size=(1, 1, 1),
        vae_stride=(1, 4), isa_config=ISAConfig(block_size=4),
        selected_context_blocks=np.array([[1], [1]]),
        exact_query_blocks=np.array([[True, False, False, True], [True, False, True, False]]),
        context_block_mass=np.array([[0.1, 0.3], [0.05, 0.2]]),
        num_source_blocks=2, num_context_blocks=2, flop_fraction=0.4,
        frames=rng.integers(60, 200, size=(2, 8, 8, 3), dtype=np.uint8),
    )


def _panel(image, index: int, scale: int = 24) -> np.ndarray:
    gap, title = 2 * scale, 6 * scale
    x = gap + index * (8 * scale + gap)
    return np.asarray(image)[title + 2:title + 8 * scale - 2, x + 2:x + 8 * scale - 2].astype(float)


@pytest.mark.parametrize("seed", [0, 7])
def test_pictures_show_kept_blocks_and_routing(seed):
    expl = _hand_made_explanation(seed)
    frame0, frame1 = render_frames(expl)
    # Context panel: frame 0's block was dropped (dimmed), frame 1's kept (bright, tinted green).
    assert _panel(frame0, 0).mean() < 0.5 * expl.frames[0].mean()
    assert _panel(frame1, 0).mean() > 0.8 * expl.frames[1].mean()
    assert _panel(frame1, 0)[..., 1].mean() > _panel(frame1, 0)[..., 0].mean()
    # Source queries: block 0 exact in both heads (red), block 1 in none (blue).
    red0, red1 = _panel(frame0, 1), _panel(frame1, 1)
    assert red0[..., 0].mean() > red0[..., 2].mean() + 40 and red1[..., 2].mean() > red1[..., 0].mean() + 40
    # Per head: head 1 routes context block 0 to exact attention, head 0 does not.
    head0, _ = render_frames(expl, head=0)
    head1, _ = render_frames(expl, head=1)
    assert _panel(head0, 2)[..., 2].mean() > _panel(head0, 2)[..., 0].mean() + 40
    assert _panel(head1, 2)[..., 0].mean() > _panel(head1, 2)[..., 2].mean() + 40
    with pytest.raises(LIVEditorError, match="head"):
        render_frames(expl, head=2)


def test_write_explanation_files(tmp_path):
    expl = _hand_made_explanation(3)
    folder = tmp_path / "explain"
    paths = write_explanation(expl, folder)
    assert [p.name for p in paths] == ["frame_000.png", "frame_001.png", EXPLAIN_VIDEO, EXPLAIN_JSON]
    assert read_video(folder / EXPLAIN_VIDEO).num_frames == 2
    record = json.loads((folder / EXPLAIN_JSON).read_text())
    assert record["flop_fraction"] == 0.4 and record["selected_context_blocks"] == [[1], [1]]
    assert record["num_kept_context_blocks"] == 1 and record["num_exact_query_blocks"] == 2
    with pytest.raises(LIVEditorError, match="already holds"):
        write_explanation(expl, folder)
    write_explanation(expl, folder, head=1, overwrite=True)
    assert json.loads((folder / EXPLAIN_JSON).read_text())["heads"] == "head 1"


def test_edit_cli_writes_the_explanation(shapeedit_model_folder, tmp_path, capsys):
    from liveditor.cli import main
    from liveditor.data.video_io import write_video

    ex = generate_example(21, "test", config=CONFIG)
    source = write_video(tmp_path / "in.mp4", ex.source, fps=16)  # the model's frame rate: no resampling
    out, folder = tmp_path / "out.mp4", tmp_path / "why"
    args = ["edit", str(source), ex.instruction, "-o", str(out), "--model", str(shapeedit_model_folder),
            "--steps", "2", "--explain", str(folder)]
    assert main(args) == 0
    assert read_video(out).num_frames == 8
    record = json.loads((folder / EXPLAIN_JSON).read_text())
    assert (record["layer"], record["step"], record["num_steps"]) == (record["num_layers"] // 2, 1, 2)
    assert len(list(folder.glob("frame_*.png"))) == 8 and read_video(folder / EXPLAIN_VIDEO).num_frames == 8
    # An explanation already there: refused before any edit is written.
    assert main([*args[:4], str(tmp_path / "second.mp4"), *args[5:]]) == 2
    assert "already holds" in capsys.readouterr().err and not (tmp_path / "second.mp4").exists()
    # A dense edit is explained as ISA would route it, and the line says so.
    capsys.readouterr()
    assert main([*args[:4], str(tmp_path / "third.mp4"), *args[5:-1], str(tmp_path / "dense"),
                 "--attention", "dense"]) == 0
    assert "the edit ran dense attention" in capsys.readouterr().out
    dense_record = json.loads((tmp_path / "dense" / EXPLAIN_JSON).read_text())
    assert dense_record["num_exact_query_blocks"] < dense_record["num_query_blocks"]  # real ISA routing
