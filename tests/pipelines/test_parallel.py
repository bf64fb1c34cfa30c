"""Several processes (gloo on CPU; NCCL on 2 GPUs in the cuda test): CFG parallel and Ulysses give
the single-process edit; the first rank alone encodes, decodes and returns frames; bad layouts and
failing ranks end the run with one error line."""

import numpy as np
import pytest
import torch

from liveditor.errors import LIVEditorError
from liveditor.pipelines.parallel import choose_degrees, launch
from parallel_workers import edit_video_input, fail_on_rank, pipeline_edits, single_transformer_outputs, \
    ulysses_transformer_outputs
from tiny_models import tiny_pipeline

CALL = dict(prompt="turn the square red", num_inference_steps=2, guidance_scale=2.5, seed=5)
LAYOUTS = [(2, 1), (1, 2)]  # CFG parallel; Ulysses over both ranks


def _single_process_frames(video_seed):
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe(video=edit_video_input(video_seed), **CALL).frames


def test_cfg_parallel_and_ulysses_edits_equal_the_single_process_edit():
    calls = [{**CALL, "video": edit_video_input(video_seed)} for video_seed in (0, 1)]
    results = launch(pipeline_edits, 2, (LAYOUTS, calls), backend="gloo")
    for video_seed, call, per_layout in zip((0, 1), calls, results):
        expected = _single_process_frames(video_seed)
        for (cfg_degree, ulysses), (frames, timings, rank_difference) in zip(LAYOUTS, per_layout):
            where = f"video seed {video_seed}, CFG {cfg_degree} x Ulysses {ulysses}"
            assert rank_difference == 0.0, f"{where}: ranks' latents differ by {rank_difference}"
            assert frames.shape == expected.shape, where
            np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-5, err_msg=where)
            assert set(timings) == {"text_encoder_s", "vae_encode_s", "denoise_s", "vae_decode_s"}, where
            assert all(v >= 0 for v in timings.values()), where


@pytest.mark.parametrize(
    "world, guidance, cfg, ulysses, expected",
    [(2, True, None, None, (2, 1)), (4, True, None, None, (2, 2)), (3, True, None, None, (1, 3)),
     (4, False, None, None, (1, 4)), (4, True, 1, None, (1, 4)), (4, True, None, 4, (1, 4)), (1, True, None, None, (1, 1))],
)
def test_default_degrees(world, guidance, cfg, ulysses, expected):
    assert choose_degrees(world, guidance, cfg, ulysses) == expected


@pytest.mark.parametrize(
    "world, guidance, cfg, ulysses, message",
    [(4, True, 2, 3, "4 GPUs cannot be split"), (4, True, None, 3, "4 GPUs cannot be split"),
     (2, False, 2, None, "needs classifier-free guidance"), (4, True, 3, None, "must be 1 or 2"),
     (4, True, None, 0, "must be a positive integer")],
)
def test_bad_degrees_are_one_line_errors(world, guidance, cfg, ulysses, message):
    with pytest.raises(LIVEditorError, match=message) as info:
        choose_degrees(world, guidance, cfg, ulysses)
    assert "\n" not in str(info.value)


def test_a_failing_rank_ends_every_rank_with_one_error_line():
    # Rank 1 raises before a barrier that rank 0 waits in: the launcher must end rank 0 too.
    with pytest.raises(LIVEditorError) as info:
        launch(fail_on_rank, 2, (1,), backend="gloo")
    assert str(info.value) == "rank 1: RuntimeError: boom on purpose"


def test_launch_returns_rank_0_result_and_rejects_bad_counts():
    assert launch(fail_on_rank, 2, (-1,), backend="gloo") == "finished"
    with pytest.raises(LIVEditorError, match="positive integer"):
        launch(fail_on_rank, 0, (-1,), backend="gloo")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["isa", "dense"])
def test_two_gpus_with_nccl_equal_one_gpu(mode, monkeypatch):
    """On 2 GPUs: Ulysses 2 gives the 1-GPU transformer output (small fp32 model), and CFG
    parallel and Ulysses give the 1-GPU edit."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # as exact_fp32() does on every rank
    cases = [dict(preset="liveditor-small", mode=mode, model_seed=seed, input_seed=seed + 10, latent=(5, 16, 16))
             for seed in (0, 1)]
    expected = single_transformer_outputs(cases, device="cuda:0")
    parallel = launch(ulysses_transformer_outputs, 2, (cases, "cuda"), backend="nccl")
    for case, ref, (out, rank_difference) in zip(cases, expected, parallel):
        assert rank_difference == 0.0, f"seed {case['model_seed']}: ranks differ by {rank_difference}"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {case['model_seed']}: {m}")

    pipe = tiny_pipeline(seed=0).to("cuda:0")
    pipe.set_progress_bar_config(disable=True)
    expected_frames = pipe(video=edit_video_input(0), **CALL, attention_kwargs={"mode": mode}).frames
    call = {**CALL, "video": edit_video_input(0), "attention_kwargs": {"mode": mode}}
    for (cfg_degree, ulysses), (frames, _, rank_difference) in zip(
            LAYOUTS, launch(pipeline_edits, 2, (LAYOUTS, [call], "cuda"), backend="nccl")[0]):
        assert rank_difference == 0.0
        np.testing.assert_allclose(frames, expected_frames, rtol=0, atol=1e-4,
                                   err_msg=f"CFG {cfg_degree} x Ulysses {ulysses}")


# ----- liveditor edit --gpus --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


def _edit(*args):
    from liveditor.cli import main as cli_main

    return cli_main(["edit", *map(str, args)])


@pytest.mark.slow
def test_edit_on_two_processes_writes_the_one_process_video(tmp_path, model_folder, capfd):
    from liveditor.data.video_io import read_video, write_video

    clip = write_video(tmp_path / "input.mp4", edit_video_input(3), fps=16)
    common = ["make the ball blue", "--model", model_folder, "--steps", "2", "--guidance", "2.5", "--device", "cpu"]
    assert _edit(clip, *common, "-o", tmp_path / "one.mp4") == 0
    capfd.readouterr()
    assert _edit(clip, *common, "-o", tmp_path / "two.mp4", "--gpus", "2") == 0
    out = capfd.readouterr().out
    assert out.count("wrote ") == 1 and "parallel: 2 ranks: CFG parallel 2 x Ulysses 1" in out
    assert "text encoder" in out and "VAE" in out
    np.testing.assert_array_equal(read_video(tmp_path / "two.mp4").frames, read_video(tmp_path / "one.mp4").frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.mp4", "one.mp4", "two.mp4"]


def test_edit_whose_ranks_fail_ends_with_one_error_line_and_no_output(tmp_path, model_folder, capfd):
    from liveditor.data.video_io import write_video

    clip = write_video(tmp_path / "input.mp4", edit_video_input(4), fps=16)
    # 3 GPUs with guidance: Ulysses 3 over the tiny model's 2 heads fails on every rank.
    rc = _edit(clip, "make the ball blue", "-o", tmp_path / "out.mp4", "--model", model_folder, "--steps", "1",
               "--guidance", "2.5", "--device", "cpu", "--gpus", "3")
    err = capfd.readouterr().err
    assert rc == 2
    # Libraries' own log lines aside (imports on each rank), one error line, the last, no traceback.
    expected = ("liveditor edit: error: Ulysses over 3 GPUs (of 3, CFG parallel 1) must divide the model's 2 "
                "attention heads; choose --gpus or --ulysses so")
    assert [line for line in err.splitlines() if line.startswith("liveditor")] == [expected]
    assert err.strip().splitlines()[-1] == expected and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.mp4"]
    assert _edit(clip, "x", "-o", tmp_path / "out.mp4", "--model", model_folder, "--ulysses", "2") == 2
    assert "need --gpus" in capfd.readouterr().err


@pytest.mark.slow
def test_a_rank_failing_mid_edit_leaves_no_output_and_no_temporary_file(tmp_path, model_folder):
    from liveditor.data.video_io import write_video
    from liveditor.pipelines.parallel import run_edit_parallel
    from parallel_workers import fail_on_rank_1_at_step_1

    clip = write_video(tmp_path / "input.mp4", edit_video_input(5), fps=16)
    with pytest.raises(LIVEditorError) as info:
        run_edit_parallel(2, input_path=clip, instruction="make the ball blue", output_path=tmp_path / "out.mp4",
                          model=model_folder, steps=3, guidance=2.5, device="cpu",
                          callback_on_step_end=fail_on_rank_1_at_step_1)
    assert str(info.value) == "rank 1: RuntimeError: rank 1 fails mid-edit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.mp4"]
