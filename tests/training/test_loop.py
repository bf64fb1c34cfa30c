"""The training loop on CPU with a tiny config: outputs, exact resume, shards, init_from, schedule,
accumulation, and 2 processes (gloo) against one."""

import json
import logging
import math
import os
import socket
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from liveditor.errors import LIVEditorError
from liveditor.training import build_components, load_config, train
from liveditor.atomic import publish_directory
from liveditor.training.loop import (
    CHECKPOINT_DIR,
    ClipSeeds,
    edit_region_weights,
    find_checkpoint,
    learning_rate,
    sample_seeds,
    video_batch_to_model,
)

TINY = [
    "model.num_layers=1", "model.num_attention_heads=2", "model.attention_head_dim=16", "model.ffn_dim=32",
    "model.freq_dim=16", "model.isa={block_size = 16}",
    "text.d_model=16", "text.num_layers=1", "text.num_heads=2", "text.d_ff=32", "text.max_length=16",
    "text.drop_prob=0.5",
    "data.frames=4", "data.height=32", "data.width=32", "data.num_workers=0",
    "codec.stats_clips=2", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
    "train.max_time_s=0", "optim.warmup_steps=1", "optim.lr=1e-3",
]


def tiny_config(tmp_path, *extra):
    return load_config(None, TINY + [f'train.output_dir="{tmp_path}"', *extra])


def log_rows(path):
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


def test_train_writes_checkpoint_log_and_a_pipeline_that_edits(tmp_path):
    from liveditor.data.shapes import ShapeEditConfig, generate_example
    from liveditor.pipelines import load_pipeline

    result = train(tiny_config(tmp_path, "train.max_steps=3"), progress=False)
    assert result.steps == 3 and result.samples == 6 and math.isfinite(result.last_loss)
    rows = log_rows(tmp_path)
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "end"
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["clips_per_s"] > 0 for r in steps)
    state = json.loads((tmp_path / CHECKPOINT_DIR / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["latents_mean"]) == 48

    pipe = load_pipeline(result.pipeline_dir)
    assert pipe.config.resolution_buckets == [[32, 32]] and pipe.config.max_sequence_length == 16
    weights = load_file(result.pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.float16 for w in weights.values())
    summary = json.loads((result.pipeline_dir / "training.json").read_text())
    assert summary["steps"] == 3 and summary["attention"] == "isa" and len(summary["stages"]) == 1
    assert summary["training_gflop_per_clip"] > 0
    example = generate_example(0, "test", config=ShapeEditConfig(frames=4, height=32, width=32))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(example.source, example.instruction, num_inference_steps=2, guidance_scale=2.0, seed=0).frames
    assert out.shape == (1, 4, 32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0


def test_resumed_run_matches_an_uninterrupted_run(tmp_path):
    # A constant learning rate, so that stopping at max_steps=2 is the same as being interrupted there.
    constant = "optim.min_lr_ratio=1.0"
    straight = train(tiny_config(tmp_path / "a", "train.max_steps=4", constant), progress=False, export=False)
    train(tiny_config(tmp_path / "b", "train.max_steps=2", constant), progress=False, export=False)
    resumed = train(tiny_config(tmp_path / "b", "train.max_steps=4", constant), progress=False, export=False)
    assert straight.steps == resumed.steps == 4
    assert [r["step"] for r in log_rows(tmp_path / "b") if "event" not in r] == [1, 2, 3, 4]
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(tmp_path / "a" / CHECKPOINT_DIR / name)
        b = load_file(tmp_path / "b" / CHECKPOINT_DIR / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    fresh = train(tiny_config(tmp_path / "b", "train.max_steps=5"), resume=False, progress=False, export=False)
    assert fresh.steps == 5  # --no-resume starts from step 0


def test_checkpoint_swap_always_leaves_a_complete_checkpoint(tmp_path):
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CHECKPOINT_DIR / "trainer_state.json").write_text('{"step": 1}')
    new = tmp_path / "new"
    new.mkdir()
    (new / "trainer_state.json").write_text('{"step": 2}')
    publish_directory(new, tmp_path / CHECKPOINT_DIR, replace=True)
    assert json.loads((find_checkpoint(tmp_path) / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / (CHECKPOINT_DIR + ".old")).exists()
    # A crash between the two renames leaves only checkpoint.old: it is found.
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / (CHECKPOINT_DIR + ".old"))
    assert find_checkpoint(tmp_path) == tmp_path / (CHECKPOINT_DIR + ".old")
    assert find_checkpoint(tmp_path / "nothing") is None


def test_training_from_shards_skips_a_corrupt_shard_with_a_warning(tmp_path, caplog):
    from liveditor.data.shapes import ShapeEditConfig
    from liveditor.data.shards import write_shapeedit_shards

    shards = tmp_path / "shards"
    write_shapeedit_shards(shards, 6, samples_per_shard=2, config=ShapeEditConfig(frames=4, height=32, width=32),
                           progress=False)
    first = sorted(shards.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:700])  # truncated
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(tmp_path / "run", f'data.source="{shards}"', "train.max_steps=3"),
                       progress=False, export=False)
    assert result.steps == 3
    assert any("corrupt" in r.getMessage() and first.name in r.getMessage() for r in caplog.records)


def test_init_from_a_pipeline_folder(tmp_path):
    first = train(tiny_config(tmp_path / "a", "train.max_steps=1"), progress=False)
    reference = load_file(first.pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    # lr ~ 0: the new run's weights are the folder's (stored in fp16).
    second = train(tiny_config(tmp_path / "b", "train.max_steps=1", "optim.lr=1e-30",
                               f'train.init_from="{first.pipeline_dir}"'), progress=False, export=False)
    assert second.steps == 1
    trained = load_file(tmp_path / "b" / CHECKPOINT_DIR / "model.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value.float(), msg=key)
    # A new stage draws new clips and noise, and training.json lists both stages.
    third = train(tiny_config(tmp_path / "d", "train.max_steps=3", "train.schedule=\"continue\"", "optim.warmup_steps=2",
                              "data.motion_weights=[3, 1, 2, 2, 2, 2, 2]", f'train.init_from="{first.pipeline_dir}"'),
                  progress=False)
    assert third.steps == 3 and third.samples == 4  # steps 1 and 2 of the schedule, after the first stage's 1
    record = json.loads((third.pipeline_dir / "training.json").read_text())
    assert [(s["stage"], s["steps"], s["global_step"]) for s in record["stages"]] == [(0, 1, 1), (1, 2, 3)]
    # Each stage says what it drew its clips from and over what schedule.
    first_warmup = tiny_config(tmp_path / "a").optim.warmup_steps
    assert [(s["motion_weights"], s["warmup_steps"], s["max_steps"]) for s in record["stages"]] == [
        ([1, 1, 1, 1, 1, 1, 1], first_warmup, 1), ([3, 1, 2, 2, 2, 2, 2], 2, 3)]
    first_log = [r for r in log_rows(tmp_path / "a") if "event" not in r]
    third_log = [r for r in log_rows(tmp_path / "d") if "event" not in r]
    assert [r["step"] for r in third_log] == [2, 3] and third_log[0]["loss"] != first_log[0]["loss"]
    # Its first step is the first of a 2-step warm-up (a fresh optimizer), at the cosine's place 1/3.
    assert third_log[0]["lr"] == pytest.approx(1e-3 * 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))))
    with pytest.raises(LIVEditorError, match="does not match"):
        train(tiny_config(tmp_path / "c", "train.max_steps=1", "model.ffn_dim=64",
                          f'train.init_from="{first.pipeline_dir}"'), progress=False)
    # An addition that starts as a no-op (the zero-initialised absolute position embedding) may
    # start from a folder without it; every other tensor is the folder's.
    train(tiny_config(tmp_path / "e", "train.max_steps=1", "optim.lr=1e-30", "model.absolute_position_embedding=true",
                      f'train.init_from="{first.pipeline_dir}"'), progress=False, export=False)
    placed = load_file(tmp_path / "e" / CHECKPOINT_DIR / "model.safetensors")
    assert placed.keys() - reference.keys() == {"position_embedding.weight"}
    assert placed["position_embedding.weight"].abs().max() < 1e-20
    for key, value in reference.items():
        torch.testing.assert_close(placed[key], value.float(), msg=key)


def test_a_resumed_stage_records_the_folder_it_started_from(tmp_path):
    first = train(tiny_config(tmp_path / "a", "train.max_steps=1"), progress=False)
    train(tiny_config(tmp_path / "b", "train.max_steps=1", f'train.init_from="{first.pipeline_dir}"'),
          progress=False, export=False)
    # The resuming command names another folder (its fallback on a machine without the checkpoint).
    resumed = train(tiny_config(tmp_path / "b", "train.max_steps=2", f'train.init_from="{tmp_path / "other"}"'),
                    progress=False)
    record = json.loads((resumed.pipeline_dir / "training.json").read_text())
    assert record["steps"] == 2 and record["init_from"] == str(first.pipeline_dir)
    assert record["stages"][-1]["init_from"] == str(first.pipeline_dir)


def test_learning_rate_schedule():
    config = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                                "train.max_steps=100", "train.max_time_s=0"])
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config, 9, 0.0) == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09))))
    assert learning_rate(config, 50, 0.0) == pytest.approx(0.55)
    assert learning_rate(config, 100, 0.0) == pytest.approx(0.1)
    timed = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=0", "optim.min_lr_ratio=0.0",
                               "train.max_steps=1000", "train.max_time_s=60"])
    assert learning_rate(timed, 10, 30.0) == pytest.approx(0.5)  # time is the nearer limit
    # A stage that continues an earlier stage's schedule (from step 60) warms its fresh optimizer up
    # again, then follows the decay of an uninterrupted run.
    assert learning_rate(config, 60, 0.0, stage_start_step=60) == pytest.approx(0.1 * learning_rate(config, 60, 0.0))
    assert learning_rate(config, 69, 0.0, stage_start_step=60) == pytest.approx(learning_rate(config, 69, 0.0))


def test_clip_and_sample_seeds_resume_and_never_overlap():
    full = list(islice(iter(ClipSeeds(3, stage=0, rank=0, world=2, batch_size=4)), 40))
    assert len(set(full)) == 40
    assert list(islice(iter(ClipSeeds(3, 0, 0, 2, 4, start_batch=5)), 20)) == full[20:40]
    others = [set(islice(iter(ClipSeeds(*key, 2, 4)), 40)) for key in ((3, 0, 1), (3, 1, 0), (4, 0, 0))]
    assert all(not (set(full) & other) for other in others)  # other process, next stage, other run
    noise = sample_seeds(3, 0, range(2000))
    assert len(set(noise.tolist())) == 2000 and noise.min() >= 0 and noise.max() < 2**62
    assert list(sample_seeds(3, 0, [1500, 7])) == [noise[1500], noise[7]]
    for key in ((3, 1), (4, 0)):
        assert not set(sample_seeds(*key, range(2000)).tolist()) & set(noise.tolist()), key


def test_too_few_shards_for_the_loader_workers_stops_training_up_front(tmp_path):
    from liveditor.data.shapes import ShapeEditConfig
    from liveditor.data.shards import write_shapeedit_shards

    shards = tmp_path / "shards"
    write_shapeedit_shards(shards, 4, samples_per_shard=2, config=ShapeEditConfig(frames=4, height=32, width=32),
                           progress=False)
    with pytest.raises(LIVEditorError, match="2 shards but 1 processes x 3 loader workers"):
        train(tiny_config(tmp_path / "run", f'data.source="{shards}"', "data.num_workers=3", "train.max_steps=1"),
              progress=False, export=False)


def test_batch_renderer_trains_on_the_same_clips(tmp_path):
    reference = train(tiny_config(tmp_path / "reference", "train.max_steps=1"), progress=False, export=False)
    batched = train(tiny_config(tmp_path / "batch", "train.max_steps=1", 'data.renderer="batch"'),
                    progress=False, export=False)
    assert reference.last_loss == pytest.approx(batched.last_loss, rel=1e-5)
    a = load_file(tmp_path / "reference" / CHECKPOINT_DIR / "model.safetensors")
    b = load_file(tmp_path / "batch" / CHECKPOINT_DIR / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("seed", [0, 1])
def test_edit_region_weights_cover_the_dilated_change(seed):
    config = load_config(None, ["train.edit_loss_weight=4.0", "train.edit_dilation=2"])
    rng = np.random.default_rng(seed)
    source = torch.from_numpy(rng.integers(0, 256, (2, 16, 64, 64, 3), dtype=np.uint8))
    target = source.clone()
    y, x = rng.integers(8, 50, 2)
    target[0, 3, y, x, 1] ^= 0x40  # one pixel of one frame of clip 0
    weights = edit_region_weights(source, target, config)
    assert weights.shape == (2, 1, 16, 16, 16)
    changed = torch.zeros(16, 16, dtype=torch.bool)
    changed[(y - 2) // 4:(y + 2) // 4 + 1, (x - 2) // 4:(x + 2) // 4 + 1] = True
    assert torch.equal(weights[0, 0, 3] == 5.0, changed), (seed, y, x)
    assert (weights[0, 0, :3] == 1).all() and (weights[1] == 1).all()


def test_model_input_from_uint8_batches():
    from liveditor.data.shapes import generate_example
    from liveditor.data.shards import example_to_tensors

    example = generate_example(4, "train")
    batch = example_to_tensors(example)["source"][None]
    model_input = video_batch_to_model(batch, "cpu")
    assert model_input.shape == (1, 3, 16, 64, 64)
    expected = torch.from_numpy(example.source).permute(3, 0, 1, 2)[None].double() / 127.5 - 1
    torch.testing.assert_close(model_input.double(), expected)
    with pytest.raises(ValueError, match="uint8"):
        video_batch_to_model(model_input, "cpu")


def test_gradient_checkpointing_gives_the_plain_step(tmp_path):
    # Recomputing activations in the backward pass changes nothing.
    plain = train(tiny_config(tmp_path / "plain", "train.max_steps=1"), progress=False, export=False)
    ckpt = train(tiny_config(tmp_path / "ckpt", "train.max_steps=1", "train.gradient_checkpointing=true"),
                 progress=False, export=False)
    assert plain.steps == ckpt.steps == 1
    a = load_file(tmp_path / "plain" / CHECKPOINT_DIR / "model.safetensors")
    b = load_file(tmp_path / "ckpt" / CHECKPOINT_DIR / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_accumulating_two_micro_batches_equals_one_batch_of_two(tmp_path):
    # Every sample draws its clip, noise level, noise and instruction drop from its own seed, so the
    # same two samples in one batch or in two accumulated micro-batches give the same gradients.
    # optim.eps=1 makes AdamW's first steps proportional to the gradient (with the default eps they
    # are its sign, which float rounding flips where a gradient is near zero).
    from accelerate.utils import set_seed

    from liveditor.training import build_components

    adam = ["optim.eps=1.0", "optim.lr=1e-2", "train.max_steps=2"]
    runs = {
        "batch": ["train.batch_size=2"],
        "accumulated": ["train.batch_size=1", "train.grad_accum_steps=2"],
        "single": ["train.batch_size=1"],
    }
    moved = {}
    for name, extra in runs.items():
        config = tiny_config(tmp_path / name, *adam, *extra)
        result = train(config, progress=False, export=False)
        set_seed(config.train.seed)
        initial = build_components(config)[3].state_dict()
        final = load_file(tmp_path / name / CHECKPOINT_DIR / "model.safetensors")
        moved[name] = torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)])
        assert result.steps == 2
    scale = moved["batch"].abs().max()
    assert scale > 0
    error = (moved["accumulated"] - moved["batch"]).abs().max() / scale
    other = (moved["single"] - moved["batch"]).abs().max() / scale
    assert error < 1e-3 and other > 0.05, (error, other)


SRC = Path(__file__).resolve().parents[2] / "src"
# AdamW with eps=1 moves each weight in proportion to its gradient (see the accumulation test above).
DDP_COMMON = TINY + ["optim.eps=1.0", "optim.lr=1e-2", "train.max_steps=2"]

WORKER = """
import sys
import torch.distributed as dist
from liveditor.training import load_config, train
config = load_config(None, sys.argv[1:])
train(config, progress=False)
print("process group ended:", not dist.is_initialized())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_batch_1_make_the_step_of_one_process_of_batch_2(tmp_path):
    overrides = DDP_COMMON + ["train.batch_size=1", f'train.output_dir="{tmp_path / "ddp"}"']
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "ACCELERATE_USE_CPU": "true",  # what `accelerate launch --cpu` sets
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *overrides], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert all("process group ended: True" in out for out in outputs), outputs[0][-3000:]

    single = load_config(None, DDP_COMMON + ["train.batch_size=2", f'train.output_dir="{tmp_path / "single"}"'])
    train(single, progress=False, export=False)

    record = json.loads((tmp_path / "ddp" / "pipeline" / "training.json").read_text())
    assert record["processes"] == 2 and record["samples"] == 4 and len(record["stages"]) == 1
    torch.manual_seed(single.train.seed)
    initial = build_components(single)[3].state_dict()
    moved = {}
    for name in ("ddp", "single"):
        final = load_file(tmp_path / name / CHECKPOINT_DIR / "model.safetensors")
        moved[name] = torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)])
    error = (moved["ddp"] - moved["single"]).abs().max() / moved["single"].abs().max()
    assert error < 1e-3, error


def test_step_attention_mode_is_a_fixed_share_of_steps_the_same_on_every_run():
    from liveditor.training.loop import step_attention_mode

    config = load_config(None, TINY + ["train.dense_fraction=0.25"])
    modes = [step_attention_mode(config, 0, step) for step in range(4000)]
    assert set(modes) == {"isa", "dense"}
    share = modes.count("dense") / len(modes)
    assert abs(share - 0.25) < 3 * math.sqrt(0.25 * 0.75 / len(modes)), share
    assert modes == [step_attention_mode(config, 0, step) for step in range(4000)]  # what a resume recomputes
    assert modes != [step_attention_mode(config, 1, step) for step in range(4000)]  # a new stage, new draws
    assert {step_attention_mode(load_config(None, TINY), 0, s) for s in range(100)} == {"isa"}
    dense_model = load_config(None, TINY + ['model.attention="dense"', "train.dense_fraction=0.5"])
    assert {step_attention_mode(dense_model, 0, s) for s in range(100)} == {"dense"}
    with pytest.raises(LIVEditorError, match="train.dense_fraction must be in"):
        load_config(None, TINY + ["train.dense_fraction=1.5"])


def test_dense_steps_of_an_isa_model_train_what_a_dense_model_trains(tmp_path):
    def weights(name, *extra):
        result = train(tiny_config(tmp_path / name, "train.max_steps=2", *extra), progress=False, export=False)
        assert result.steps == 2
        return load_file(tmp_path / name / CHECKPOINT_DIR / "model.safetensors")

    all_dense_steps = weights("isa_dense_steps", "train.dense_fraction=1.0")
    dense_model = weights("dense", 'model.attention="dense"')
    isa_model = weights("isa")
    assert all_dense_steps.keys() == dense_model.keys()
    for key in dense_model:
        torch.testing.assert_close(all_dense_steps[key], dense_model[key], rtol=0, atol=0, msg=key)
    # Control: ISA steps train something else, so the equality above is the mode's doing.
    assert any(not torch.equal(isa_model[k], dense_model[k]) for k in dense_model)


CLOCK_WORKER = """
import sys, torch.distributed as dist
from liveditor.training.loop import AgreedClock
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
clock = AgreedClock(2, train_time_s=10.0)
for step_s in ([0.5, 0.25] if rank == 0 else [0.125, 1.0]):  # each process measures other step times
    clock.advance(step_s, session_s=3.0 + rank)
    print("clock", clock.train_time_s, clock.session_s, flush=True)
dist.destroy_process_group()  # exiting with a live gloo group can abort in its threads at shutdown
"""


def test_processes_agree_on_training_time_so_time_limits_stop_them_at_the_same_step(tmp_path):
    # A limit read from each process's own clock stopped the processes at different steps and the
    # first to stop left the other waiting in its next collective (seen with train.max_time_s).
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", CLOCK_WORKER, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = [[tuple(map(float, line.split()[1:])) for line in out.splitlines() if line.startswith("clock ")]
             for out in outputs]
    # Both see the largest clock after every step: 10 + max(0.5, 0.125), then that + max(0.25, 1.0).
    assert lines[0] == lines[1] == [(10.5, 4.0), (11.5, 4.0)], outputs


@pytest.mark.parametrize("renderer", ["reference", "batch"])
@pytest.mark.parametrize("weights, families, motions", [
    (["data.family_weights=[0, 0, 0, 0, 1, 2]"], {"background", "motion"}, None),
    (["data.family_weights=[0, 0, 0, 0, 0, 1]", "data.motion_weights=[1, 0, 0, 0, 0, 0, 1]"], {"motion"},
     {"reverse", "down"}),
])
def test_procedural_training_clips_follow_data_family_and_motion_weights(renderer, weights, families, motions):
    from liveditor.data.shapes import generate_example
    from liveditor.data.shapes_batch import example_seeds
    from liveditor.training.loop import _batches, _shapeedit_config

    config = load_config(None, TINY + weights + [f'data.renderer="{renderer}"'])
    batch = next(_batches(config, 0, 0, 1, 0, torch.device("cpu")))
    seeds = example_seeds(config.train.seed, 0, 0, config.train.batch_size, 0, 1)
    shape_config = _shapeedit_config(config)
    expected = [generate_example(int(s), "train", config=shape_config) for s in seeds]
    assert {e.family for e in expected} <= families
    if motions is not None:
        assert {e.metadata["edit"]["motion"] for e in expected} <= motions
    assert list(batch["instruction"]) == [e.instruction for e in expected]
    assert np.array_equal(np.asarray(batch["target"]), np.stack([e.target for e in expected]))


def test_batch_renderer_stream_yields_each_batch_in_order():
    # The loop's batches are rendered one ahead of the one it trains on; the stream still yields
    # batch k's clips at step k.
    from liveditor.data.shapes import generate_example
    from liveditor.data.shapes_batch import example_seeds
    from liveditor.training.loop import _batches, _shapeedit_config

    config = load_config(None, TINY + ['data.renderer="batch"'])
    batches = _batches(config, 2, 1, 2, 3 * config.train.batch_size, torch.device("cpu"))
    shape_config = _shapeedit_config(config)
    for index in (3, 4, 5):
        batch = next(batches)
        seeds = example_seeds(config.train.seed, 2, index, config.train.batch_size, 1, 2)
        expected = [generate_example(int(s), "train", config=shape_config) for s in seeds]
        assert list(batch["instruction"]) == [e.instruction for e in expected], index
        assert np.array_equal(np.asarray(batch["source"]), np.stack([e.source for e in expected])), index
        assert np.array_equal(np.asarray(batch["target"]), np.stack([e.target for e in expected])), index


def _start_event(output_dir):
    return next(row for row in log_rows(output_dir) if row.get("event") == "start")


def test_cuda_graphs_apply_only_to_compiled_blocks_on_cuda(tmp_path):
    # On the CPU (and without compile) the setting is recorded as off and the step runs as before.
    train(tiny_config(tmp_path, "train.max_steps=1", "train.cuda_graphs=true"), progress=False, export=False)
    assert _start_event(tmp_path)["cuda_graphs"] is False


def _weight_steps(output_dir, *extra) -> dict:
    """Train the tiny config with `extra` settings; each transformer weight's change, by name."""
    from accelerate.utils import set_seed

    config = tiny_config(output_dir, *extra)
    train(config, progress=False, export=False)
    set_seed(config.train.seed)
    initial = build_components(config)[3].state_dict()
    final = load_file(output_dir / CHECKPOINT_DIR / "model.safetensors")
    return {key: final[key] - initial[key] for key in initial}


def test_compiled_step_trains_what_the_eager_step_trains(tmp_path):
    # train.compile with the loop's Inductor options (reductions of up to 16 elements unrolled, as
    # ISA's block means are) moves every weight as the eager step does, up to rounding: measured
    # per tensor, since a wrong block mean moves the attention's weights (3-12 % of their movement
    # with means over 17 tokens) but not the largest movements elsewhere (rounding: under 1e-4).
    extra = ["model.attention=\"isa\"", "train.batch_size=1", "optim.eps=1.0", "optim.lr=1e-2", "train.max_steps=2"]
    eager = _weight_steps(tmp_path / "eager", *extra, "train.compile=false")
    compiled = _weight_steps(tmp_path / "compiled", *extra, "train.compile=true")
    errors = {key: ((compiled[key] - step).abs().max() / step.abs().max()).item()
              for key, step in eager.items() if step.abs().max() > 0}
    assert len(errors) == len(eager)  # every weight moved
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-2, (worst, errors[worst])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_trains_what_the_compiled_step_trains(tmp_path):
    # Replayed graphs reuse their output buffers: a step that read a buffer after the next replay
    # overwrote it would move the weights differently. ISA with dense steps (two sets of graphs) and
    # two accumulated micro-batches per step (a replay between forward and optimizer step).
    extra = ["model.attention=\"isa\"", "train.dense_fraction=0.5", "train.compile=true", "train.batch_size=1",
             "train.grad_accum_steps=2", "optim.eps=1.0", "optim.lr=1e-2", "train.max_steps=4"]
    moved = {}
    for name, graphs in (("compiled", "false"), ("graphs", "true")):
        steps = _weight_steps(tmp_path / name, *extra, f"train.cuda_graphs={graphs}")
        moved[name] = torch.cat([steps[key].flatten() for key in sorted(steps)])
        assert _start_event(tmp_path / name)["cuda_graphs"] is (graphs == "true")
    scale = moved["compiled"].abs().max()
    assert scale > 0
    error = (moved["graphs"] - moved["compiled"]).abs().max() / scale
    assert error < 1e-2, error


def test_cli_summary_counts_this_runs_clips_and_names_the_global_step(tmp_path, capsys):
    from liveditor.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text("")
    common = ["train", "--config", str(config), "--quiet"] + [arg for item in TINY for arg in ("--set", item)]
    assert main(common + ["--output-dir", str(tmp_path / "a"), "--set", "train.max_steps=1"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith("trained 2 clips in ") and "now at global step 1," in first
    # A continued stage: two more steps of 2 clips, global steps 2 and 3.
    assert main(common + ["--output-dir", str(tmp_path / "b"), "--set", "train.max_steps=3",
                          "--set", 'train.schedule="continue"',
                          "--set", f'train.init_from="{tmp_path / "a" / "pipeline"}"']) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert second.startswith("trained 4 clips in ") and "now at global step 3," in second
