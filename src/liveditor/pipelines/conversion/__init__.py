"""Converting the released LIVEditor-14B checkpoint and a Wan2.2 base folder into a LIVEditor
pipeline folder (`liveditor convert`).

- `release`: the release's checkpoint layouts and the original-Wan -> LIVEditor transformer names;
- `wan_base`: the tokenizer, umT5 encoder and VAE from a diffusers or original Wan2.2 folder;
- `convert`: `convert_checkpoint`, which writes the folder and reports what it left out.
"""

from .convert import ConversionReport, convert_checkpoint
from .release import (
    RELEASE_ISA_CONFIG,
    ReleaseCheckpoint,
    build_transformer,
    load_release_checkpoint,
    map_release_weights,
    release_entries,
)

__all__ = [
    "RELEASE_ISA_CONFIG",
    "ConversionReport",
    "ReleaseCheckpoint",
    "build_transformer",
    "convert_checkpoint",
    "load_release_checkpoint",
    "map_release_weights",
    "release_entries",
]
