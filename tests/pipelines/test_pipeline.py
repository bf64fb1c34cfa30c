import json
import numpy as np
import pytest
import torch

from liveditor.data.video_io import write_video
from liveditor.errors import LIVEditorError
from liveditor.pipelines import WAN_NEGATIVE_PROMPT, LIVEditorPipeline, load_pipeline
from liveditor.pipelines.pipeline_liveditor import choose_bucket, resize_center_crop, snap_frame_count
from liveditor.pipelines.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _video(n=6, height=40, width=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_end_to_end_video_has_bucket_shape_snapped_frames_and_fps(pipe, tmp_path):
    video = _video(n=7, height=40, width=60)  # 3:2 -> the 64x96 bucket; 7 frames -> 5 (4k+1)
    out = pipe(video, "turn the square red", num_inference_steps=2, seed=3)
    assert out.frames.shape == (1, 5, 64, 96, 3)
    assert out.fps == 16.0
    assert out.frames.dtype == np.float32 and out.frames.min() >= 0 and out.frames.max() <= 1
    assert out.frames.std() > 0.01
    # Written to disk at the pipeline fps, read back as a video of the same shape.
    path = write_video(tmp_path / "edit.mp4", out.frames[0], fps=out.fps)
    from liveditor.data.video_io import read_video

    back = read_video(path)
    assert back.frames.shape == (5, 64, 96, 3) and back.fps == pytest.approx(16)


def test_path_input_and_seed_determinism(pipe, tmp_path):
    path = write_video(tmp_path / "in.mp4", _video(n=5, height=64, width=40, seed=1), fps=10)
    a = pipe(str(path), "add a hat", num_inference_steps=2, seed=7).frames
    b = pipe(path, "add a hat", num_inference_steps=2, generator=torch.Generator().manual_seed(7)).frames
    c = pipe(path, "add a hat", num_inference_steps=2, seed=8).frames
    assert a.shape == (1, 5, 96, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_instruction_and_context_both_change_the_result(pipe):
    video = _video(n=5, height=64, width=64, seed=2)
    base = pipe(video, "make it snow", num_inference_steps=2, seed=0).frames
    other_text = pipe(video, "make it night", num_inference_steps=2, seed=0).frames
    other_video = pipe(_video(n=5, height=64, width=64, seed=9), "make it snow", num_inference_steps=2, seed=0).frames
    assert np.abs(base - other_text).max() > 1e-4
    assert np.abs(base - other_video).max() > 1e-4


def test_cfg_runs_text_and_negative_branch_with_the_same_context(pipe, monkeypatch):
    calls = []
    original = type(pipe.transformer).forward

    def spy(self, hidden_states, timestep, encoder_hidden_states, context_latents, **kwargs):
        calls.append((encoder_hidden_states.clone(), context_latents.clone()))
        return original(self, hidden_states, timestep, encoder_hidden_states, context_latents, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", spy)
    video = _video(n=5, height=64, width=64)
    pipe(video, "blur the background", num_inference_steps=2, guidance_scale=2.5, seed=0)
    assert len(calls) == 4  # 2 steps x (text, negative)
    (text, ctx_a), (negative, ctx_b) = calls[0], calls[1]
    torch.testing.assert_close(ctx_a, ctx_b)
    assert not torch.allclose(text, negative)
    # Without guidance: one branch per step.
    calls.clear()
    pipe(video, "blur the background", num_inference_steps=2, guidance_scale=1.0, seed=0)
    assert len(calls) == 2


def test_default_negative_prompt_is_wans(pipe, monkeypatch):
    seen = []
    original = pipe._encode_text

    def spy(texts, device, dtype):
        seen.extend(texts)
        return original(texts, device, dtype)

    monkeypatch.setattr(pipe, "_encode_text", spy)
    pipe(_video(n=1, height=64, width=64), "recolor", num_inference_steps=1, seed=0)
    assert seen == ["recolor", WAN_NEGATIVE_PROMPT]


def test_attention_kwargs_reach_the_transformer(pipe):
    video = _video(n=5, height=64, width=64)
    isa = pipe(video, "x", num_inference_steps=1, seed=0, output_type="latent").frames
    dense = pipe(video, "x", num_inference_steps=1, seed=0, output_type="latent", attention_kwargs={"mode": "dense"}).frames
    assert isa.shape == dense.shape == (1, 4, 2, 8, 8)
    assert not torch.allclose(isa, dense)
    assert pipe.transformer.attention_mode == "isa"


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, LIVEditorPipeline)
    assert loaded.resolution_buckets == pipe.resolution_buckets
    assert loaded.scheduler.config.flow_shift == 6.0 and loaded.scheduler.config.prediction_type == "flow_prediction"
    video = _video(n=5, height=64, width=64)
    a = pipe(video, "x", num_inference_steps=2, seed=1).frames
    b = loaded(video, "x", num_inference_steps=2, seed=1).frames
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_inputs(pipe):
    video = _video(n=5, height=64, width=64)
    with pytest.raises(LIVEditorError, match="instruction is empty"):
        pipe(video, "   ")
    with pytest.raises(LIVEditorError, match="unsupported resolution 544x960"):
        pipe(video, "x", height=544, width=960)
    with pytest.raises(LIVEditorError, match="no frames"):
        pipe(video[:0], "x")
    with pytest.raises(LIVEditorError, match="no frames"):
        pipe([], "x")
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        pipe(video[..., :2], "x")
    with pytest.raises(LIVEditorError, match="does not exist"):
        pipe("/nonexistent/video.mp4", "x")


def test_geometry_helpers():
    buckets = [(544, 960), (960, 544), (720, 720), (480, 960), (960, 480)]
    assert choose_bucket(1080, 1920, buckets) == (544, 960)
    assert choose_bucket(1920, 1080, buckets) == (960, 544)
    assert choose_bucket(500, 520, buckets) == (720, 720)
    assert choose_bucket(400, 820, buckets) == (480, 960)
    assert [snap_frame_count(n, 4) for n in (1, 4, 5, 8, 9, 61, 64)] == [1, 1, 5, 5, 9, 61, 61]
    # Resize-then-crop keeps the centre: a bright square in the middle stays in the middle.
    frames = torch.zeros(2, 3, 40, 120)
    frames[:, :, 15:25, 55:65] = 1.0
    out = resize_center_crop(frames, 16, 16)
    assert out.shape == (2, 3, 16, 16)
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    assert abs(ys.float().mean() - 7.5) < 1 and abs(xs.float().mean() - 7.5) < 1


def test_other_components_with_the_same_interface_drop_in(tmp_path):
    """The pixel codec and word tokenizer of the bundled tiny model work through save/load too."""
    from liveditor.models import LIVEditorTransformer3DModel
    from liveditor.models.tiny_codec import SpaceToDepthVideoCodec
    from liveditor.models.tiny_text import build_text_encoder, build_word_tokenizer
    from liveditor.pipelines import flow_unipc_scheduler

    codec = SpaceToDepthVideoCodec(scale_factor_spatial=4, scale_factor_temporal=1)
    tokenizer = build_word_tokenizer(["red", "blue", "circle", "make"], model_max_length=8)
    torch.manual_seed(0)
    encoder = build_text_encoder(len(tokenizer), d_model=32)
    transformer = LIVEditorTransformer3DModel.from_preset(
        "liveditor-tiny", in_channels=codec.config.z_dim, out_channels=codec.config.z_dim, text_dim=32)
    pipe = LIVEditorPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=codec, scheduler=flow_unipc_scheduler(),
                             transformer=transformer, resolution_buckets=[(32, 32)], max_sequence_length=8,
                             max_num_frames=4)
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    out = loaded(_video(n=6, height=40, width=40), "make the circle red", num_inference_steps=2, seed=0)
    assert out.frames.shape == (1, 4, 32, 32, 3)  # temporal factor 1: every frame up to max_num_frames


def test_sampling_defaults_come_from_the_pipeline_folder(pipe, tmp_path, monkeypatch):
    assert (pipe.config.default_num_inference_steps, pipe.config.default_guidance_scale) == (32, 2.5)
    pipe.save_pretrained(tmp_path / "p")
    index = tmp_path / "p" / "model_index.json"
    config = json.loads(index.read_text())
    config.update(default_num_inference_steps=3, default_guidance_scale=1.0)
    index.write_text(json.dumps(config))
    loaded = load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    calls = []
    original = type(loaded.transformer).forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(loaded.transformer), "forward", spy)
    loaded(_video(n=5, height=64, width=64), "x", seed=0)
    assert len(calls) == 3  # 3 steps, one branch each (guidance 1.0 disables CFG)
    calls.clear()
    loaded(_video(n=5, height=64, width=64), "x", num_inference_steps=2, guidance_scale=2.0, seed=0)
    assert len(calls) == 4
