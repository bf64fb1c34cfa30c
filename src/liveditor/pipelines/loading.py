"""Finding, checking and loading LIVEditor pipeline folders with one-line errors."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

from ..errors import LIVEditorError, require

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
# A component folder holds one of these (models: config.json, scheduler: scheduler_config.json,
# tokenizer: tokenizer_config.json or tokenizer.json).
_COMPONENT_MARKERS = ("config.json", "scheduler_config.json", "tokenizer_config.json", "tokenizer.json")
OFFLOAD_MODES = ("model", "group", "sequential")


def default_model_path() -> Path:
    """The bundled tiny LIVEditor pipeline folder (`liveditor/assets/tiny-liveditor`)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-liveditor"


def resolve_device(device=None):
    """`device` as a torch.device (default: CUDA when available, else the CPU); one-line errors for
    an unknown device name or an absent CUDA device."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LIVEditorError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LIVEditorError(f"device {device} was asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LIVEditorError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def parse_offload(offload) -> str | None:
    """`offload` as one of OFFLOAD_MODES or None: False/None -> None, True -> "model" (the meaning
    of the former boolean flag); anything else is a one-line error."""
    if offload is None or offload is False:
        return None
    if offload is True:
        return "model"
    if offload not in OFFLOAD_MODES:
        raise LIVEditorError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    return offload


def check_pipeline_folder(path=None) -> Path:
    """Raise a one-line LIVEditorError unless `path` (default: the bundled tiny model) is a
    complete LIVEditor pipeline folder."""
    if path is None:
        path = default_model_path()
        if not path.exists():
            raise LIVEditorError(f"the bundled tiny model is missing at {path}; pass --model <pipeline folder>")
    path = Path(path)
    if not path.exists():
        raise LIVEditorError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise LIVEditorError(f"model path {path} is not a folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise LIVEditorError(f"model folder {path} has no model_index.json (not a pipeline folder)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise LIVEditorError(f"model folder {path}: model_index.json is not valid JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise LIVEditorError(f"model folder {path}: model_index.json is not a JSON object")
    if index.get("_class_name") != "LIVEditorPipeline":
        raise LIVEditorError(
            f"model folder {path} holds a {index.get('_class_name')!r} pipeline, not a LIVEditorPipeline"
        )
    for name in REQUIRED_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise LIVEditorError(f"model folder {path} lacks the {name} component in model_index.json")
        folder = path / name
        if not folder.is_dir() or not any((folder / marker).is_file() for marker in _COMPONENT_MARKERS):
            raise LIVEditorError(f"model folder {path} lacks the {name} component (no {folder} with its config)")
    return path


def _import_own_component_modules(path: Path) -> None:
    """diffusers loads a component class from a module only once that module is imported; import
    the ones of this package that the folder names (never any other package's code)."""
    index = json.loads((path / "model_index.json").read_text())
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            module = entry[0]
            if module == "liveditor" or module.startswith("liveditor."):
                try:
                    importlib.import_module(module)
                except ImportError as exc:
                    raise LIVEditorError(f"model folder {path}: component {name} needs {module}, which cannot be imported ({exc})") from exc


def load_pipeline(
    path=None,
    device=None,
    dtype=None,
    offload: bool | str | None = None,
    vae_tiling: bool = False,
    compile: bool = False,
    fp8: bool = False,
):
    """Load a LIVEditorPipeline folder for inference.

    Args:
        path: pipeline folder (default: the bundled tiny model, `default_model_path()`).
        device: where to run ("cpu", "cuda", "cuda:1"; default: CUDA when available).
        dtype: transformer and text-encoder dtype; default bfloat16 on CUDA, float32 elsewhere.
            The VAE always stays float32.
        offload: keep the weights in CPU memory: "model", "group" or "sequential" (True means
            "model"); see `liveditor.pipelines.acceleration.enable_offload`.
        vae_tiling: decode/encode in tiles to cap VAE memory.
        compile: regional torch.compile of the transformer blocks (the first step compiles).
        fp8: FP8 linear layers in the transformer blocks (torchao; CUDA, compute capability 8.9+).
    """
    import torch

    from .acceleration import check_fp8_device, compile_transformer, enable_fp8, enable_offload
    from .pipeline_liveditor import LIVEditorPipeline

    path = check_pipeline_folder(path)
    device = resolve_device(device)
    offload = parse_offload(offload)
    if compile and offload in ("group", "sequential"):
        # Their hooks wrap each block's forward in compiler-disabled code: nothing would compile.
        raise LIVEditorError(f"--compile cannot be combined with --offload {offload}")
    if fp8 and offload:  # converted weights under offloading hooks: not supported (nor measured)
        raise LIVEditorError("--fp8 cannot be combined with --offload")
    if offload and device.type != "cuda":
        raise LIVEditorError("--offload needs a CUDA device")
    if fp8:  # the device first: installing torchao would not help a GPU without FP8
        check_fp8_device(device)
        require("torchao")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _import_own_component_modules(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = LIVEditorPipeline.from_pretrained(str(path), torch_dtype={"default": dtype, "vae": torch.float32})
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LIVEditorError(f"cannot load model folder {path}: {reason}") from exc
    pipe.set_progress_bar_config(leave=False)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if offload:
        enable_offload(pipe, offload, device)
    else:
        pipe.to(device)
    if fp8:
        enable_fp8(pipe.transformer)
    if compile:  # after the FP8 conversion, so that the blocks compile once, with their final weights
        compile_transformer(pipe.transformer)
    return pipe
