"""`convert_checkpoint`: the released checkpoint plus a Wan2.2 base folder -> a LIVEditor pipeline folder."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...atomic import atomic_directory
from ...errors import LIVEditorError
from ..pipeline_liveditor import LIVEDITOR_14B_BUCKETS, LIVEditorPipeline, flow_unipc_scheduler
from .release import UNUSED_NAMES, ReleaseCheckpoint, TransformerReport, build_transformer, load_release_checkpoint
from .wan_base import base_layout, base_num_heads, write_base_components

_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")


@dataclass
class ConversionReport:
    """What a conversion wrote and what it left out of the checkpoint."""

    out: Path
    base_layout: str  # "diffusers" or "original"
    checkpoint: ReleaseCheckpoint
    transformer: TransformerReport

    def summary(self) -> str:
        """One line: weights placed, what was ignored and why, which copy was taken, the base."""
        t, c = self.transformer, self.checkpoint
        parts = [f"transformer: {t.loaded} weights ({t.parameters / 1e9:.2f} B parameters) from {c.num_raw} entries",
                 f"ignored {t.unused} present-but-unused ({UNUSED_NAMES}) and {c.skipped} non-model "
                 "(vae./optimizer/scheduler)"]
        if t.ignored_unknown:
            parts.append(f"dropped {len(t.ignored_unknown)} unknown (--ignore-unknown-keys)")
        if c.copies_taken:
            parts.append(c.copies_summary())
        parts.append(f"tokenizer, text encoder and VAE from the {self.base_layout} Wan2.2 folder")
        return f"wrote {self.out}: " + "; ".join(parts)


def convert_checkpoint(
    checkpoint,
    base,
    out,
    dtype: torch.dtype | None = None,
    ignore_unknown_keys: bool = False,
    prefer: str = "last",
    resolution_buckets=None,
) -> ConversionReport:
    """Write a complete LIVEditor pipeline folder at `out` (which must not exist yet).

    Args:
        checkpoint: the released `liveditor_ckpt.bin`, in any layout the release's loader accepts
            (see `liveditor.pipelines.conversion.release`).
        base: a Wan2.2-T2V-A14B folder, diffusers or original layout (see `wan_base`).
        out: the new folder; written under a temporary name next to it and renamed at the end.
        dtype: cast the transformer's floating weights (None: keep the checkpoint's dtype).
        ignore_unknown_keys: drop checkpoint keys that have no place in the model (the release's
            non-strict load) instead of refusing them.
        prefer: which copy of a weight present several times to take: "last" (the release's rule),
            "model" or "model_ema".
        resolution_buckets: the pipeline's buckets (default: the 14B model's).
    """
    base, out = Path(base), Path(out)
    if out.exists():
        raise LIVEditorError(f"output folder {out} already exists; choose a new path")
    if not out.parent.is_dir():
        raise LIVEditorError(f"output's parent folder {out.parent} does not exist")
    layout = base_layout(base)
    progress = tqdm(total=4, desc="convert", unit="step", disable=None)
    try:
        progress.set_postfix_str("reading the checkpoint")
        release = load_release_checkpoint(checkpoint, prefer)
        progress.update()
        progress.set_postfix_str("mapping the transformer")
        transformer, transformer_report = build_transformer(release, base_num_heads(base, layout), dtype,
                                                            ignore_unknown_keys)
        progress.update()
        with atomic_directory(out) as tmp:
            progress.set_postfix_str(f"base components ({layout} layout)")
            entries = write_base_components(base, tmp, layout)
            progress.update()
            progress.set_postfix_str("writing the transformer")
            transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            flow_unipc_scheduler().save_pretrained(tmp / "scheduler")
            index = {
                "_class_name": LIVEditorPipeline.__name__,
                "_diffusers_version": _diffusers_version(),
                **pipeline_config(resolution_buckets),
                **entries,
                "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                "transformer": [type(transformer).__module__, type(transformer).__name__],
            }
            (tmp / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
        progress.update()
    finally:
        progress.close()
    return ConversionReport(out=out, base_layout=layout, checkpoint=release, transformer=transformer_report)


def pipeline_config(resolution_buckets=None) -> dict:
    """LIVEditorPipeline's own config defaults (the 14B model's: fps, frame limit, text length,
    sampling defaults), with the given resolution buckets."""
    config = {name: p.default for name, p in inspect.signature(LIVEditorPipeline.__init__).parameters.items()
              if name not in ("self", *_COMPONENTS) and p.default is not inspect.Parameter.empty}
    buckets = resolution_buckets or LIVEDITOR_14B_BUCKETS
    config["resolution_buckets"] = [list(hw) for hw in buckets]
    return config


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
