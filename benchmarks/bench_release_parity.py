"""How much the release's joint blocking changes a converted model's output, against ours.

The release's kernel cuts the concatenated sequence `[source | context]` into 64-token blocks, so one
block straddles the boundary whenever a segment is not a multiple of 64 tokens, and padded keys keep
softmax weight; we pad source and context to whole blocks apart (padding carries no weight). This
script converts a tiny checkpoint in the release's naming (`tests/pipelines/release_layout.py`, as
the conversion parity test builds it) with the project's converter and runs one transformer forward
with the release's ISA setting (top-k sharpness, floor counts, the paper's ratios, 64-token blocks)
at segment lengths that are not multiples of 64, with `ISAConfig.blocking` "separate" (ours) and
"joint" (the release's, emulated in the PyTorch path). Reported: the relative L2 difference of the
transformer output and of layer 0's attention output (same q, k, v, gate), and for scale the
difference ISA vs dense (exact attention + the gated coarse residual). CPU, seconds.

    python benchmarks/bench_release_parity.py --json docs/release_parity.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

# The release-named tiny checkpoint is built by the conversion tests' helper, written from the facts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pipelines"))
from release_layout import HEADS_TINY, SIZE_TINY, release_state_dict  # noqa: E402

from liveditor.atomic import write_json  # noqa: E402
from liveditor.isa import ISAConfig, coarse_residual, dense_attention, isa_attention  # noqa: E402
from liveditor.pipelines.conversion import RELEASE_ISA_CONFIG, build_transformer, release_entries  # noqa: E402

# Latent (frames, height, width); patch (1, 2, 2) gives the token grid. 180 and 1,050 tokens per segment:
# 180 = 2 x 64 + 52 and 1,050 = 16 x 64 + 26, so one joint block straddles the boundary in each. The
# control, 256 = 4 x 64 tokens, has whole blocks: there both blockings agree (to rounding).
DEFAULT_LATENTS = ((2, 18, 20), (5, 28, 30), (2, 16, 32))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(seed: int, latent_shape, config: ISAConfig) -> dict:
    sd = release_state_dict(seed=seed)
    model, _ = build_transformer(release_entries({"model_ema." + k: v for k, v in sd.items()}), num_heads=HEADS_TINY)
    g = torch.Generator().manual_seed(seed)
    channels = SIZE_TINY["in_channels"]
    latents = torch.randn(2, channels, *latent_shape, generator=g)
    context = torch.randn(2, channels, *latent_shape, generator=g)
    text = torch.randn(2, 7, SIZE_TINY["text_dim"], generator=g)
    timestep = torch.tensor([937.5, 250.0])  # a high- and a low-noise step
    separate, joint = replace(config, blocking="separate"), replace(config, blocking="joint")

    layer0 = {}

    def keep_layer0(event):
        if event.layer == 0:
            layer0.update(q=event.query, k=event.key, v=event.value, gate=event.gate, num_source=event.num_source,
                          info=event.info)

    def forward(kwargs):
        with torch.no_grad():
            return model(latents, timestep, text, context_latents=context, attention_kwargs=kwargs).sample

    out_separate = forward({"mode": "isa", "isa_config": separate, "callback": keep_layer0})
    out_joint = forward({"mode": "isa", "isa_config": joint})
    out_dense = forward({"mode": "dense"})

    q, k, v, gate, num_source = (layer0[key] for key in ("q", "k", "v", "gate", "num_source"))
    with torch.no_grad():
        att_separate, info_separate = isa_attention(q, k, v, num_source, separate, gate=gate, return_info=True)
        att_joint, info_joint = isa_attention(q, k, v, num_source, joint, gate=gate, return_info=True)
        att_dense = dense_attention(q, k, v) + coarse_residual(q, k, v, num_source, gate, separate)
    return {
        "seed": seed,
        "tokens_per_segment": num_source,
        "joint_vs_separate": {"transformer": relative(out_joint, out_separate),
                              "layer0_attention": relative(att_joint, att_separate)},
        "separate_vs_dense": {"transformer": relative(out_separate, out_dense),
                              "layer0_attention": relative(att_separate, att_dense)},
        "joint_vs_dense": {"transformer": relative(out_joint, out_dense),
                           "layer0_attention": relative(att_joint, att_dense)},
        "blocks": {"separate": [info_separate.num_source_blocks, info_separate.num_context_blocks],
                   "joint": [info_joint.num_source_blocks, info_joint.num_context_blocks]},
        "flop_fraction": {"separate": info_separate.flop_fraction, "joint": info_joint.flop_fraction},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, nargs=3, action="append", metavar=("F", "H", "W"),
                        help="latent (frames, height, width) of each segment; repeatable "
                             "(default: 2x18x20, 5x28x30 and the control 2x16x32)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="weight and input seeds")
    parser.add_argument("--json", type=Path, help="write the results here (docs/release_parity.json)")
    args = parser.parse_args(argv)
    latents = [tuple(x) for x in args.latent] if args.latent else list(DEFAULT_LATENTS)
    for shape in latents:
        if any(x < 1 for x in shape) or shape[1] % 2 or shape[2] % 2:
            parser.error(f"--latent {shape}: frames >= 1 and even height and width (patch 1x2x2)")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be non-negative")
    config = ISAConfig(**RELEASE_ISA_CONFIG)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    rows = []
    print(f"ISA {asdict(config)} vs blocking=\"joint\"; tiny release-named model ({SIZE_TINY['layers']} layers, {HEADS_TINY} heads of "
          f"{SIZE_TINY['dim'] // HEADS_TINY}), batch 2 (t = 937.5, 250)")
    header = (f"{'latent':>9} {'tokens':>6} {'seed':>4} {'blocks sep':>10} {'blocks joint':>12} "
              f"{'joint-vs-sep out':>16} {'joint-vs-sep L0':>15} {'ISA-vs-dense out':>16} {'ISA-vs-dense L0':>15}")
    print(header)
    for shape in latents:
        for seed in args.seeds:
            row = {"latent": list(shape), **measure(seed, shape, config)}
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>9} {row['tokens_per_segment']:>6} {seed:>4} "
                  f"{'+'.join(map(str, row['blocks']['separate'])):>10} {'+'.join(map(str, row['blocks']['joint'])):>12} "
                  f"{row['joint_vs_separate']['transformer']:>16.3e} {row['joint_vs_separate']['layer0_attention']:>15.3e} "
                  f"{row['separate_vs_dense']['transformer']:>16.3e} {row['separate_vs_dense']['layer0_attention']:>15.3e}")

    summary = {}
    for shape in latents:
        chosen = [r for r in rows if tuple(r["latent"]) == shape]
        summary["x".join(map(str, shape))] = {
            name: {part: {"mean": sum(r[name][part] for r in chosen) / len(chosen), "max": max(r[name][part] for r in chosen)}
                   for part in ("transformer", "layer0_attention")}
            for name in ("joint_vs_separate", "separate_vs_dense", "joint_vs_dense")
        }
    print("\nmean over seeds (relative L2)")
    for key, s in summary.items():
        print(f"  latent {key}: joint vs separate {s['joint_vs_separate']['transformer']['mean']:.3e} (transformer), "
              f"{s['joint_vs_separate']['layer0_attention']['mean']:.3e} (layer 0); ISA (separate) vs dense "
              f"{s['separate_vs_dense']['transformer']['mean']:.3e}, {s['separate_vs_dense']['layer0_attention']['mean']:.3e}")

    if args.json:
        result = {
            "command": "python benchmarks/bench_release_parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "isa_config": {key: value for key, value in asdict(config).items() if key != "blocking"},
            "blockings": ["separate", "joint"],
            "model": {**SIZE_TINY, "heads": HEADS_TINY},
            "timesteps": [937.5, 250.0],
            "rows": rows,
            "summary": summary,
        }
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
