"""The `liveditor` command. Thin: each subcommand parses arguments and calls library code.

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and sets
`handler` to a function of the parsed arguments.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import re
import select
import signal
import sys
import warnings

from .errors import LIVEditorError, missing_dependency_message

MAX_SEED = 2**63 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Argument types: every numeric option is checked while parsing, before anything is imported.


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _float_in(minimum: float | None = None, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < -1 or value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be -1 (random) or between 0 and {MAX_SEED}, got {value}")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


def _add_isa_report(subparsers) -> None:
    p = subparsers.add_parser(
        "isa-report",
        help="ISA-vs-dense fidelity on structured video-like inputs",
        description="Run ISA against dense attention on synthetic video in-context attention "
        "inputs and print relative L1/L2 error, cosine similarity and FLOP fraction per config.",
    )
    p.add_argument("--frames", type=_int_at_least(1), default=8, help="latent frames per segment")
    p.add_argument("--height", type=_int_at_least(1), default=16, help="latent rows per frame")
    p.add_argument("--width", type=_int_at_least(1), default=24, help="latent columns per frame")
    p.add_argument("--heads", type=_int_at_least(1), default=4)
    p.add_argument("--head-dim", type=_int_at_least(1), default=64)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON")

    def handler(args):
        from .isa.report import run_fidelity_report

        run_fidelity_report(
            grid=(args.frames, args.height, args.width),
            heads=args.heads,
            head_dim=args.head_dim,
            seed=args.seed,
            device=args.device,
            json_path=args.json_path,
        )

    p.set_defaults(handler=handler)


def _add_edit(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit a video by an instruction with a LIVEditor pipeline",
        description="Edit INPUT as the instruction says and write an H.264 mp4 of the same duration at the "
        "model's frame rate (16 fps for LIVEditor-14B), with the input's audio. A video longer than the model's "
        "window is edited in overlapping windows. Prints the fps in and out, the bucket and crop, the total time "
        "and the share of it spent in self-attention.",
    )
    p.add_argument("input", help="input video (mp4, mov, webm, mkv, avi or gif)")
    p.add_argument("instruction", help='the edit, e.g. "turn the car red"')
    p.add_argument("-o", "--output", required=True, help="output .mp4 (must not exist unless --overwrite)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    p.add_argument("--attention", choices=("isa", "dense"), default=None,
                   help="self-attention: isa (sparse) or dense (default: the model's own setting)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="denoising steps (default: the model's, 32 for LIVEditor-14B)")
    p.add_argument("--guidance", type=_float_in(), default=None,
                   help="text CFG scale; 1 disables CFG (default: the model's, 2.5 for LIVEditor-14B)")
    p.add_argument("--seed", type=_seed, default=42,
                   help="noise seed, the same for every window (default 42, as the release; -1: random, printed)")
    p.add_argument("--window", type=_int_at_least(1), default=None,
                   help="frames edited in one pass (default: the model's window, 81 for LIVEditor-14B); "
                   "longer videos are edited in windows overlapping by a quarter")
    p.add_argument("--start", type=_float_in(0.0), default=0.0, help="edit from this time (seconds)")
    p.add_argument("--duration", type=_float_in(0.0, strict=True), default=None,
                   help="edit this many seconds (default: to the end)")
    p.add_argument("--resize", choices=("crop", "pad"), default="crop",
                   help="fit the frame to the model's bucket by centre crop (default, as the release) or by "
                   "padding (the bars are removed from the output)")
    p.add_argument("--negative-prompt", default=None, help="CFG negative prompt (default: the release's, Wan's)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--offload", nargs="?", const="model", default=None, choices=("model", "group", "sequential"),
                   help="keep weights in CPU memory, with VAE tiling: model (bare --offload: each component on the "
                   "GPU while it runs), group (one block at a time, copies overlapped with compute) "
                   "or sequential (least memory, slowest)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (faster steps; the first step compiles; not with "
                   "--offload group or sequential)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 linear layers in the transformer blocks (faster, small error; needs torchao and a GPU of "
                   "compute capability 8.9+; not with --offload)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--gpus", type=_int_at_least(1), default=None,
                   help="run on N GPUs of this host (one process each): CFG parallel when guided and N is even, "
                   "Ulysses sequence parallel over the rest; under torchrun the ranks are torchrun's")
    p.add_argument("--cfg-parallel", type=int, choices=(1, 2), default=None,
                   help="with --gpus: GPU groups for the two guidance branches (default: 2 when possible)")
    p.add_argument("--ulysses", type=_int_at_least(1), default=None,
                   help="with --gpus: GPUs sharing one branch by sequence parallelism (default: the rest)")
    p.add_argument("--explain", metavar="DIR", default=None,
                   help="also draw what ISA does on this edit (middle layer, middle step; ISA attention even where "
                        "the edit ran dense) over the input frames: PNGs, mp4, JSON")

    def handler(args):
        from .pipelines.edit import run_edit
        from .pipelines.parallel import launched_by_torchrun, run_edit_parallel

        if args.explain:
            from .eval.explain import check_explain_folder

            check_explain_folder(args.explain, args.overwrite)
        parallel = args.gpus is not None or launched_by_torchrun()
        if not parallel and (args.cfg_parallel is not None or args.ulysses is not None):
            raise LIVEditorError("--cfg-parallel and --ulysses need --gpus (or a torchrun launch)")

        edit = functools.partial(run_edit_parallel, args.gpus, args.cfg_parallel, args.ulysses) if parallel else run_edit
        report = edit(
            input_path=args.input,
            instruction=args.instruction,
            output_path=args.output,
            model=args.model,
            attention=args.attention,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            window=args.window,
            start=args.start,
            duration=args.duration,
            resize=args.resize,
            negative_prompt=args.negative_prompt,
            device=args.device,
            offload=args.offload,
            compile=args.compile,
            fp8=args.fp8,
            overwrite=args.overwrite,
        )
        if report is None:  # a rank other than the first of a torchrun launch
            return
        if args.explain:
            from .eval.explain import explain_video_edit

            explain_video_edit(args.input, args.instruction, args.explain, model=args.model,
                               edit_attention=report.attention_mode, steps=args.steps, guidance=args.guidance, seed=report.seed, window=args.window,
                               start=args.start, duration=args.duration, resize=args.resize,
                               negative_prompt=args.negative_prompt, device=args.device, offload=args.offload,
                               overwrite=args.overwrite)

    p.set_defaults(handler=handler)


def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert the released liveditor_ckpt.bin into a pipeline folder",
        description="Map the released checkpoint (original Wan naming, any layout the release's loader accepts) "
        "onto LIVEditorTransformer3DModel and write a complete pipeline folder (safetensors) with the Wan2.2 "
        "tokenizer, umT5 text encoder and VAE. Strict: a missing weight, a wrong shape or an unknown key is an error.",
    )
    p.add_argument("--checkpoint", required=True, help="liveditor_ckpt.bin (torch pickle, loaded weights-only)")
    p.add_argument("--base", required=True,
                   help="Wan2.2-T2V-A14B folder: the original one (models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, "
                   "google/umt5-xxl) or the diffusers one")
    p.add_argument("--out", required=True, help="new pipeline folder (must not exist)")
    p.add_argument("--dtype", choices=("keep", "bf16", "fp16", "fp32"), default="keep",
                   help="transformer weight dtype (default: the checkpoint's)")
    p.add_argument("--ignore-unknown-keys", action="store_true",
                   help="drop checkpoint keys the model has no place for (as the release does) instead of failing")
    p.add_argument("--prefer", choices=("last", "model", "model_ema"), default="last",
                   help="when a weight is stored both as model.* and model_ema.*: take the one that comes last in "
                   "the file (the release's rule, default) or always this prefix")

    def handler(args):
        import torch

        from .pipelines.conversion import convert_checkpoint

        dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        report = convert_checkpoint(args.checkpoint, args.base, args.out, dtype=dtype,
                                    ignore_unknown_keys=args.ignore_unknown_keys, prefer=args.prefer)
        print(report.summary())

    p.set_defaults(handler=handler)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LIVEditor model with flow matching (ShapeEdit data; resumable; accelerate)",
        description="Train LIVEditor from a TOML/YAML/JSON config: Wan flow matching, AdamW, EMA, bf16 on GPU, "
        "ISA or dense attention. Resumes from <output_dir>/checkpoint when present and writes the EMA weights as "
        "a pipeline folder at the end. Multi-GPU: accelerate launch -m liveditor.cli train --config FILE.",
    )
    p.add_argument("--config", required=True, help="training config (.toml, .yaml/.yml or .json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), e.g. --set optim.lr=1e-4; repeatable")
    p.add_argument("--output-dir", default=None, help="override train.output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--max-time", type=float, default=None, help="override train.max_time_s (seconds of training)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    p.add_argument("--no-export", action="store_true", help="do not write the pipeline folder at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def handler(args):
        import json
        import logging

        from .training import load_config, train

        overrides = list(args.overrides)
        if args.output_dir is not None:
            overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.max_time is not None:
            overrides.append(f"train.max_time_s={args.max_time}")
        config = load_config(args.config, overrides)
        _warn_if_training_on_cpu(config)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        result = train(config, resume=not args.no_resume, progress=not args.quiet, export=not args.no_export)
        print(
            # result.steps is the global step (earlier stages and resumed runs included), samples this run's.
            f"trained {result.samples} clips in {result.train_time_s:.1f} s ({result.samples_per_s:.1f} clips/s), "
            f"now at global step {result.steps}, last loss {result.last_loss:.4f}; "
            f"checkpoint in {result.output_dir}" + (f", pipeline in {result.pipeline_dir}" if result.pipeline_dir else "")
        )

    p.set_defaults(handler=handler)


def _warn_if_training_on_cpu(config) -> None:
    """One warning line when a config sized for a GPU is about to train on the CPU."""
    import torch

    if torch.cuda.is_available():
        return
    # Measured on a CPU with configs/tiny-shapeedit.toml (32 clips of 16x64x64, 8 layers of 256):
    # about 3 minutes and 20 GB a step; cost grows with clip pixels per step and model width x depth.
    model, data = config.model, config.data
    scale = (config.train.batch_size * data.frames * data.height * data.width / (32 * 16 * 64 * 64)
             * model.num_layers * model.num_attention_heads * model.attention_head_dim / (8 * 256))
    if scale >= 0.05:
        warnings.warn(
            f"no CUDA device: training on the CPU, about {3 * scale:.1f} min and {20 * scale:.0f} GB a step with "
            "this config; configs/tiny-shapeedit-cpu.toml is sized for trying it on a CPU", stacklevel=2)


def _add_make_data(subparsers) -> None:
    p = subparsers.add_parser(
        "make-data",
        help="write ShapeEdit training shards (WebDataset-style tar files)",
        description="Generate procedural ShapeEdit edit pairs (exact targets) into tar shards plus an "
        "index.json manifest. Deterministic: clip SEED of a split is always the same.",
    )
    p.add_argument("-o", "--output", required=True,
                   help="output folder: new, empty, or a dataset to replace with --overwrite")
    p.add_argument("-n", "--num-examples", type=int, required=True, help="number of clips")
    p.add_argument("--split", choices=("train", "val", "test"), default="train")
    p.add_argument("--start-seed", type=int, default=0, help="seed of the first clip")
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="edit families (default all: swap recolor add remove background motion)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in the folder (swapped in once the new one is complete)")

    def handler(args):
        from .data.shapes import ShapeEditConfig
        from .data.shards import write_shapeedit_shards

        config = ShapeEditConfig(frames=args.frames, height=args.height, width=args.width)
        manifest = write_shapeedit_shards(
            args.output, args.num_examples, args.split, args.start_seed, args.samples_per_shard,
            config, args.families, overwrite=args.overwrite,
        )
        print(f"wrote {manifest['num_samples']} {args.split} clips in {len(manifest['shards'])} shards to {args.output}")

    p.set_defaults(handler=handler)


def _add_prune_blocks(subparsers) -> None:
    p = subparsers.add_parser(
        "prune-blocks",
        help="copy a pipeline folder with fewer transformer blocks (to train a faster model from a trained one)",
        description="Write a copy of a pipeline folder whose transformer keeps only some of its blocks, to start a "
        "faster model's training from (train.init_from). Name the blocks with --keep, or let --drop N choose: each "
        "round leaves out the block whose absence raises the training loss least (the loop's loss under --config on "
        "--clips fixed training clips and noise, dense attention).",
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="new pipeline folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep", type=_block_list, help="blocks to keep, e.g. 0,1,2,6,7")
    which.add_argument("--drop", type=_int_at_least(1),
                       help="how many blocks to leave out, chosen greedily by the loss")
    p.add_argument("--config", default=None,
                   help="with --drop: the training config whose loss and data to measure (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --drop: override a config key")
    p.add_argument("--clips", type=_int_at_least(1), default=24,
                   help="with --drop: training clips measured (default 24)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="with --drop: noise seed (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="with --drop: where to measure (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (swapped in once complete)")

    def handler(args):
        from .training import load_config
        from .training.prune import choose_blocks_to_keep, prune_blocks

        keep = args.keep
        if args.drop is not None:
            keep, full, rounds = choose_blocks_to_keep(args.model, args.drop, load_config(args.config, args.set),
                                                       clips=args.clips, seed=args.seed, device=args.device)
            print(f"loss of the whole model: {full:.5f}")
            for n, r in enumerate(rounds, 1):
                row = ", ".join(f"{b}: {v:.5f}" for b, v in r.losses.items())
                print(f"round {n}, loss without block {{{row}}} -> drops block {r.dropped}")
        out = prune_blocks(args.model, keep, args.output, overwrite=args.overwrite)
        print(f"kept blocks {','.join(map(str, sorted(keep)))}; wrote {out}")

    p.set_defaults(handler=handler)


def _block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers separated by commas, got {text!r}") from None


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="benchmarks: `liveditor eval shapeedit` (held-out ShapeEdit edits, ISA vs dense), `eval compare`",
        description="Evaluation benchmarks.",
    )
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    b = benchmarks.add_parser(
        "shapeedit",
        help="PSNR, SSIM and success rate per edit family on held-out ShapeEdit clips, ISA and dense",
        description="Edit PER_FAMILY held-out clips of every ShapeEdit family with each attention mode on the "
        "same weights and noise, score them against the exact targets (PSNR, SSIM, success: edited region "
        "right and the rest preserved, see liveditor.eval.metrics) and report the ISA-vs-dense output PSNR.",
    )
    b.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    b.add_argument("--per-family", type=_int_at_least(1), default=10, help="held-out clips per edit family (default 10)")
    b.add_argument("--families", nargs="+", default=None, metavar="FAMILY", help="default: all six")
    b.add_argument("--split", choices=("test", "val"), default="test",
                   help="test: the held-out benchmark (default); val: the clips to choose settings and stages on")
    b.add_argument("--attention", nargs="+", choices=("isa", "dense"), default=["isa", "dense"])
    b.add_argument("--steps", type=_int_at_least(1), default=None, help="denoising steps (default: the model's)")
    b.add_argument("--guidance", type=_float_in(), default=None, help="text CFG scale (default: the model's)")
    b.add_argument("--seed", type=_int_at_least(0), default=0, help="noise seed, the same for every clip and mode")
    b.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    b.add_argument("--fp8", action="store_true",
                   help="FP8 linear layers in the transformer blocks (torchao; CUDA, compute capability 8.9+)")
    b.add_argument("--json", dest="json_path", default=None, help="also write all per-clip scores as JSON")

    def handler(args):
        from .atomic import write_json
        from .data.shapes import FAMILIES, ShapeEditConfig
        from .eval.shapeedit import evaluate_shapeedit, format_summary, pipeline_edit_fn
        from .pipelines.loading import load_pipeline, resolve_device

        device = resolve_device(args.device)
        pipe = load_pipeline(args.model, device=device, fp8=args.fp8)
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole benchmark
        height, width = pipe.resolution_buckets[0]
        steps, guidance = pipe.sampling_settings(args.steps, args.guidance)
        result = evaluate_shapeedit(
            pipeline_edit_fn(pipe, steps, guidance, args.seed),
            per_family=args.per_family,
            attentions=args.attention,
            families=args.families or FAMILIES,
            config=ShapeEditConfig(height=height, width=width),
            split=args.split,
        )
        result["settings"].update(model=str(args.model or "bundled tiny model"), device=str(device), steps=steps,
                                  guidance=guidance, seed=args.seed, fp8=args.fp8)
        print(format_summary(result))
        if args.json_path:
            write_json(args.json_path, result)
            print(f"wrote {args.json_path}")

    b.set_defaults(handler=handler)

    c = benchmarks.add_parser(
        "compare",
        help="two `eval shapeedit --json` results on the same clips, clip by clip (won, lost, sign test)",
        description="Compare result NEW with result BASE on the clips both scored (the same split, ShapeEdit "
        "config and clips; settings such as the model, guidance or steps may differ): success rates per family, "
        "per kind of motion edit and overall, clips only NEW passes (won) and only BASE passes (lost), and the "
        "two-sided sign test's p-value on those counts.",
    )
    c.add_argument("base", help="JSON written by `liveditor eval shapeedit --json` (the model to beat)")
    c.add_argument("new", help="JSON of the candidate, on the same clips")
    c.add_argument("--attention", nargs="+", choices=("isa", "dense"), default=None,
                   help="modes to compare (default: every mode both results scored)")
    c.add_argument("--json", dest="json_path", default=None, help="also write the comparison as JSON")

    def compare_handler(args):
        from .atomic import write_json
        from .eval.compare import compare_results, format_comparison, load_result

        comparison = compare_results(load_result(args.base), load_result(args.new), args.attention,
                                     names=(args.base, args.new))
        print(format_comparison(comparison))
        if args.json_path:
            write_json(args.json_path, comparison)
            print(f"wrote {args.json_path}")

    c.set_defaults(handler=compare_handler)


def _add_record_activations(subparsers) -> None:
    p = subparsers.add_parser(
        "record-activations",
        help="ISA fidelity on real q/k/v recorded from a trained model",
        description="Edit held-out ShapeEdit clips with a pipeline, record the self-attention q/k/v of chosen "
        "layers at chosen denoising steps, and run the ISA-vs-dense fidelity report on them (both sharpness "
        "statistics, raster vs tile order, ratio variations).",
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    p.add_argument("--clips", type=_int_at_least(1), default=2, help="held-out clips to edit (default 2, mixed families)")
    p.add_argument("--layers", type=_int_at_least(0), nargs="+", default=None,
                   help="layer indices (default: first, middle, last)")
    p.add_argument("--at-steps", type=_int_at_least(0), nargs="+", default=None,
                   help="denoising step indices (default: first, middle, last)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="denoising steps of each edit (default: the model's)")
    p.add_argument("--guidance", type=_float_in(), default=None, help="text CFG scale (default: the model's)")
    p.add_argument("--device", type=_device, default=None)
    p.add_argument("--save", default=None, help="also save the recorded q/k/v (torch .pt)")
    p.add_argument("--json", dest="json_path", default=None, help="write the fidelity rows as JSON")

    def handler(args):
        import torch

        from .data.shapes import ShapeEditConfig, generate_example
        from .eval.activations import activation_fidelity, record_attention
        from .atomic import write_json
        from .isa.report import format_table
        from .pipelines.loading import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        num_layers = len(pipe.transformer.blocks)
        steps, guidance = pipe.sampling_settings(args.steps, args.guidance)
        layers = args.layers if args.layers is not None else sorted({0, num_layers // 2, num_layers - 1})
        at_steps = args.at_steps if args.at_steps is not None else sorted({0, steps // 2, steps - 1})
        for name, values, limit in (("--layers", layers, num_layers), ("--at-steps", at_steps, steps)):
            if max(values) >= limit:
                raise LIVEditorError(f"{name} must be below {limit} for this model and step count, got {values}")
        height, width = pipe.resolution_buckets[0]
        options = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width,
                   "output_type": "latent", "seed": 0}
        records = []
        for seed in range(args.clips):
            example = generate_example(seed, "test", config=ShapeEditConfig(height=height, width=width))
            records += record_attention(pipe, example.source, example.instruction, layers, at_steps, **options)
        if args.save:
            from .atomic import atomic_output

            with atomic_output(args.save) as handle:
                torch.save([vars(r) for r in records], handle)
        result = activation_fidelity(records)
        print(f"ISA vs dense on {len(records)} recorded self-attention calls (layers {layers}, steps {at_steps} "
              f"of {steps}, {args.clips} clips); mean over records:")
        print(format_table(result["mean"]))
        print(f"lowest error among the sharpness/order defaults: {result['best_default']}")
        if args.json_path:
            write_json(args.json_path, {"layers": layers, "steps": at_steps, "num_inference_steps": steps, **result})

    p.set_defaults(handler=handler)


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="edit a fresh ShapeEdit clip with the bundled tiny model; write input, edit, side by side",
        description="Generate a held-out ShapeEdit clip, edit it (default: the bundled tiny model) and write "
        "input.mp4, edit.mp4, side_by_side.mp4 (input | edit | ground truth) and demo.json into DIR.",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--seed", type=_seed, default=-1, help="clip and noise seed (default -1: random, printed)")
    p.add_argument("--family", choices=("swap", "recolor", "add", "remove", "background", "motion"), default=None,
                   help="edit family (default: from the seed)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    p.add_argument("--attention", choices=("isa", "dense"), default=None, help="default: the model's setting")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=_float_in(), default=None, help="text CFG scale (default: the model's)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace demo files already in DIR")

    def handler(args):
        from .demo import run_demo

        run_demo(args.output, seed=args.seed, family=args.family, model=args.model, attention=args.attention,
                 steps=args.steps, guidance=args.guidance, device=args.device, overwrite=args.overwrite)

    p.set_defaults(handler=handler)


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="a local web editor (Gradio) on this machine",
        description="Serve a web page to edit videos with a LIVEditor pipeline: upload, instruction, ISA settings, "
        "progress, cancel, download, and pictures of what ISA did. One edit runs at a time; others wait in a queue. "
        "Binds to 127.0.0.1 (this machine only) unless --host says otherwise; nothing is sent anywhere.",
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_at_least(1), default=7860)
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--max-seconds", type=_float_in(0.0, strict=True), default=60.0,
                   help="longest input video accepted (default 60 s)")

    def handler(args):
        from .serve import serve

        serve(model=args.model, host=args.host, port=args.port, device=args.device, max_seconds=args.max_seconds)

    p.set_defaults(handler=handler)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liveditor")
    except PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


def _add_debug_option(parser: argparse.ArgumentParser) -> None:
    """`--debug` is accepted after any (sub)command too, e.g. `liveditor edit ... --debug`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show full tracebacks on errors")
                _add_debug_option(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liveditor", description="LIVEditor: in-context video editing with sparse attention.")
    parser.add_argument("--version", action="version", version=f"liveditor {_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_isa_report(subparsers)
    _add_edit(subparsers)
    _add_convert(subparsers)
    _add_train(subparsers)
    _add_prune_blocks(subparsers)
    _add_make_data(subparsers)
    _add_eval(subparsers)
    _add_record_activations(subparsers)
    _add_demo(subparsers)
    _add_serve(subparsers)
    _add_debug_option(parser)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"liveditor: warning: {message}", file=sys.stderr)


def _tune_collector_for_one_command() -> None:
    """Spare Python's cyclic garbage collector the objects that torch, diffusers and transformers
    create on import (over 400,000, alive until exit), for a process that runs one command: with the
    default first threshold (700) it traverses them all in several full collections while they are
    imported, about 0.7 s on 2 CPU cores. (Freezing them at exit would save about 1 s more, but
    leaves Triton's nanobind objects uncollected, and nanobind prints a leak report for each.)"""
    gc.set_threshold(10_000)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv`; None: this process's own, as the `liveditor` program (only then
    is the garbage collector tuned, see `_tune_collector_for_one_command`)."""
    if argv is None:
        _tune_collector_for_one_command()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.showwarning = _show_warning
    try:
        args.handler(args)
        sys.stdout.flush()  # here, not at exit, so a reader that went away is met by the handler below
    except LIVEditorError as exc:
        if args.debug:
            raise
        print(f"liveditor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_dependency_message(exc.name)
        if message is None or args.debug:
            raise
        print(f"liveditor {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"liveditor {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`liveditor eval compare ... | head`): end quietly, as
        # other command-line tools do, with stdout on /dev/null so the exit's flush cannot fail
        # again. Any other broken pipe (e.g. to a video encoder) is a failure and keeps its traceback.
        fd = _stdout_descriptor()
        if fd is None or not _reader_gone(fd):
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return 0


def _stdout_descriptor() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (e.g. captured)
        return None


def _reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe whose reading end is closed: poll reports an error on it."""
    if not hasattr(select, "poll"):  # Windows: no way to tell here, so the broken pipe stays an error
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
