import json
import numpy as np
import pytest
import torch

from liveditor.data.video_io import write_video
from liveditor.errors import LIVEditorError
from liveditor.pipelines import LIVEDITOR_14B_BUCKETS, WAN_NEGATIVE_PROMPT, LIVEditorPipeline, load_pipeline
from liveditor.pipelines.pipeline_liveditor import (
    FrameFit,
    choose_bucket,
    clean_prompt,
    resize_center_crop,
    snap_frame_count,
)
from tiny_models import tiny_pipeline


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
    # Guidance exactly 1: one branch per step; any other scale (below 1 too) runs CFG, as the release.
    calls.clear()
    pipe(video, "blur the background", num_inference_steps=2, guidance_scale=1.0, seed=0)
    assert len(calls) == 2
    calls.clear()
    pipe(video, "blur the background", num_inference_steps=2, guidance_scale=0.5, seed=0)
    assert len(calls) == 4


def test_default_negative_prompt_is_the_releases(pipe, monkeypatch):
    import liveditor.pipelines.pipeline_liveditor as module

    seen = []
    original = module.encode_instructions

    def spy(tokenizer, text_encoder, prompts, max_length, device=None):
        seen.append(list(prompts))
        return original(tokenizer, text_encoder, prompts, max_length, device)

    monkeypatch.setattr(module, "encode_instructions", spy)
    pipe(_video(n=1, height=64, width=64), "recolor", num_inference_steps=1, guidance_scale=2.0)
    assert seen == [["recolor"], [WAN_NEGATIVE_PROMPT]]
    # The release's spelling: Wan's 28 Chinese terms joined by ", " (not Wan2.2's full-width commas).
    terms = WAN_NEGATIVE_PROMPT.split(", ")
    assert len(terms) == 28 and terms[:2] == ["色调艳丽", "过曝"] and terms[-1] == "倒着走"
    assert "，" not in WAN_NEGATIVE_PROMPT


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
    for guidance in (float("nan"), float("inf")):
        with pytest.raises(LIVEditorError, match="guidance scale must be a finite number"):
            pipe(video, "x", guidance_scale=guidance)
    with pytest.raises(LIVEditorError, match="seed must be at most"):
        pipe(video, "x", seed=2**64)
    with pytest.raises(LIVEditorError, match="inference steps"):
        pipe(video, "x", num_inference_steps=0)
    with pytest.raises(ValueError, match="not both"):
        pipe(video, "x", prompt_embeds=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(video, "x", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(LIVEditorError, match="resize mode"):
        pipe(video, "x", resize_mode="stretch")


def _release_bucket(height, width):
    """Independent statement of the release's rule: nearest W/H (linear) among the exact ratios."""
    exact = {(544, 960): 16 / 9, (960, 544): 9 / 16, (720, 720): 1.0, (480, 960): 2.0, (960, 480): 0.5}
    return min(exact, key=lambda b: abs(exact[b] - width / height))


def test_geometry_helpers():
    assert choose_bucket(1080, 1920, LIVEDITOR_14B_BUCKETS) == (544, 960)
    assert choose_bucket(1920, 1080, LIVEDITOR_14B_BUCKETS) == (960, 544)
    assert choose_bucket(480, 640, LIVEDITOR_14B_BUCKETS) == (720, 720)  # 4:3 is nearer 1:1 than 16:9
    assert choose_bucket(400, 820, LIVEDITOR_14B_BUCKETS) == (480, 960)
    # Between 1:1 and 16:9 the exact ratios decide (midpoint 1.3889), not the buckets' own 960/544.
    assert choose_bucket(1000, 1385, LIVEDITOR_14B_BUCKETS) == (720, 720)
    assert choose_bucket(1000, 1392, LIVEDITOR_14B_BUCKETS) == (544, 960)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(100, 4000, (200, 2)):
        assert choose_bucket(int(h), int(w), LIVEDITOR_14B_BUCKETS) == _release_bucket(h, w), (h, w)
    assert [snap_frame_count(n, 4) for n in (1, 4, 5, 8, 9, 61, 64)] == [1, 1, 5, 5, 9, 61, 61]
    # Cover size rounded up to a multiple of 16, then the centre cropped.
    assert FrameFit.plan((480, 640), (720, 720)).resized == (720, 960)
    assert FrameFit.plan((720, 1280), (544, 960)).resized == (544, 976)
    assert FrameFit.plan((1080, 1920), (544, 960)).resized == (544, 976)
    pad = FrameFit.plan((480, 640), (720, 720), "pad")
    assert pad.resized == (540, 720) and pad.content == (90, 0, 540, 720)
    # Resize-then-crop keeps the centre: a bright square in the middle stays in the middle.
    frames = torch.zeros(2, 3, 40, 120)
    frames[:, :, 15:25, 55:65] = 1.0
    out = resize_center_crop(frames, 16, 16)
    assert out.shape == (2, 3, 16, 16)
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    assert abs(ys.float().mean() - 7.5) < 1 and abs(xs.float().mean() - 7.5) < 1
    # Padding keeps the whole picture, centred on black.
    padded = FrameFit.plan((40, 120), (16, 16), "pad").apply(frames)
    assert padded.shape == (2, 3, 16, 16) and padded[:, :, :5].abs().max() == 0 and padded[:, :, -5:].abs().max() == 0


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


def test_file_input_is_resampled_to_the_model_fps_and_lands_on_the_releases_bucket(tmp_path):
    """A 30 fps, 640x480 clip: the 14B buckets give 720x720 (the release's choice), frames at 16 fps."""
    pipe = tiny_pipeline(seed=0, resolution_buckets=LIVEDITOR_14B_BUCKETS)
    frames = np.random.default_rng(4).integers(0, 256, (30, 480, 640, 3), dtype=np.uint8)
    path = write_video(tmp_path / "vga.mp4", frames, fps=30)  # 1 s
    pixels, fit = pipe.prepare_video(path)
    assert fit.bucket == (720, 720) and fit.resized == (720, 960)
    assert pixels.shape == (1, 3, 13, 720, 720)  # 16 frames at 16 fps, snapped down to 4k+1
    assert "centre crop of 480x480 from 640x480" in fit.describe()


def test_sampling_grid_is_wans(pipe):
    """Wan's FlowUniPC grid, computed here independently: sigmas linear from 0.999 towards 0, shifted,
    then a final 0; integer timesteps sigma * 1000 (truncated)."""
    shift = pipe.scheduler.config.flow_shift
    for steps in (1, 4, 32):
        timesteps = pipe.set_sampling_timesteps(steps)
        expected = []
        for i in range(steps):
            s = 0.999 * (1 - i / steps)
            expected.append(shift * s / (1 + (shift - 1) * s))
        np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), expected + [0.0], rtol=1e-6, atol=1e-7)
        assert timesteps.tolist() == [int(s * 1000) for s in expected]
    assert (pipe.scheduler.config.solver_order, pipe.scheduler.config.solver_type) == (2, "bh2")


@pytest.mark.parametrize("seed", [0, 42, 12345])
def test_initial_noise_is_float32_randn_from_a_generator_seeded_with_the_seed(pipe, monkeypatch, seed):
    first_inputs = []
    original = type(pipe.transformer).forward

    def spy(self, hidden_states, *args, **kwargs):
        first_inputs.append(hidden_states.clone())
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", spy)
    video = _video(n=5, height=64, width=64, seed=seed)
    pipe(video, "x", num_inference_steps=1, guidance_scale=1.0, seed=seed, output_type="latent")
    noise = first_inputs[0][0]
    expected = torch.randn(tuple(noise.shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    torch.testing.assert_close(noise, expected, rtol=0, atol=0, msg=f"seed {seed}")


def test_default_seed_is_42_and_negative_seed_is_random(pipe):
    video = _video(n=5, height=64, width=64, seed=5)
    default = pipe(video, "x", num_inference_steps=1, output_type="latent").frames
    np.testing.assert_array_equal(default, pipe(video, "x", num_inference_steps=1, seed=42, output_type="latent").frames)
    a = pipe(video, "x", num_inference_steps=1, seed=-1, output_type="latent").frames
    b = pipe(video, "x", num_inference_steps=1, seed=-1, output_type="latent").frames
    assert not torch.equal(a, b)


def test_step_callback_sees_and_replaces_tensors_and_can_interrupt(pipe, monkeypatch):
    video = _video(n=5, height=64, width=64, seed=6)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), sorted(kwargs), p.num_timesteps, p.guidance_scale))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else {}

    out = pipe(video, "x", num_inference_steps=3, guidance_scale=2.0, output_type="latent",
               callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][2] == ["latents", "negative_prompt_embeds", "prompt_embeds"] and seen[0][3:] == (3, 2.0)
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.count_nonzero(out.frames) == 0  # the callback's latents replaced the pipeline's

    calls = []
    original = type(pipe.transformer).forward
    monkeypatch.setattr(type(pipe.transformer), "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def cancel(p, step, timestep, kwargs):
        p._interrupt = True
        return {}

    pipe(video, "x", num_inference_steps=4, guidance_scale=1.0, callback_on_step_end=cancel)
    assert len(calls) == 1 and pipe.interrupt


def test_prompt_list_embeds_and_latents(pipe):
    video = _video(n=5, height=64, width=64, seed=7)
    single = pipe(video, "make it red", num_inference_steps=2, seed=3).frames
    both = pipe(video, ["make it red", "make it blue"], num_inference_steps=2, seed=3).frames
    assert both.shape == (2, *single.shape[1:])
    np.testing.assert_allclose(both[0], single[0], atol=1e-5)  # the first prompt gets the same noise
    assert np.abs(both[0] - both[1]).max() > 1e-4
    embeds, negative = pipe.encode_prompt("make it red", None, True)
    via_embeds = pipe(video, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, seed=3).frames
    np.testing.assert_allclose(via_embeds, single, atol=1e-6)
    noise = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    via_latents = pipe(video, "make it red", num_inference_steps=2, latents=noise).frames
    np.testing.assert_allclose(via_latents, single, atol=1e-6)


def test_prompt_cleaning_is_wans():
    assert clean_prompt("  turn\tthe \n car   red  ") == "turn the car red"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # unescaped twice, as Wan does
    pytest.importorskip("ftfy")
    assert clean_prompt("caf\u00c3\u00a9 sign") == "caf\u00e9 sign"  # mojibake repaired by ftfy
