"""Faster and smaller single-GPU inference: regional torch.compile, FP8 linear layers, offloading.

- `compile_transformer`: compiles each `LIVEditorTransformerBlock` (diffusers' regional compilation,
  `compile_repeated_blocks`); the 40 blocks of the 14B model share one compiled graph, ISA included
  (its operators are torch custom ops, so the whole block traces without a graph break).
- `enable_fp8`: torchao's float8 inference linears (dynamic row-wise scaling of activations and
  weights) for the blocks' projections and FFN; `measure_fp8_error` reports the error against bf16.
- `enable_offload`: diffusers' offloading hooks, mode "model", "group" or "sequential".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..errors import LIVEditorError, require
from .loading import OFFLOAD_MODES, parse_offload

# FP8 converts the linears that carry almost all of a step's FLOPs: per block the self- and
# cross-attention projections (q, k, v, out) and the two FFN matrices. Left in bf16: the patch
# embeddings (convolutions), the time/text embedder and the output head (run once per forward, a
# negligible share of the FLOPs, and their error would reach every token), and each layer's
# coarse-residual gate `attn1.coarse_gate` (one output feature, below FP8 GEMM's 16-multiple
# sizes, and it steers ISA's routing, where rounding would flip decisions).
FP8_LINEAR_NAME = re.compile(r"^blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|^blocks\.\d+\.ffn\.net\.(0\.proj|2)$")
FP8_MIN_CAPABILITY = (8, 9)


def compile_transformer(transformer, fullgraph: bool = True, **compile_kwargs) -> None:
    """Regional compilation: `torch.compile` each transformer block in place (its first forward at a
    new shape compiles; the blocks share the compiled code). `fullgraph=True` fails on a graph break
    instead of running part of a block eagerly. Other keyword arguments go to `torch.compile`."""
    transformer.compile_repeated_blocks(fullgraph=fullgraph, **compile_kwargs)


# ----- FP8 ---------------------------------------------------------------------------------------


def is_fp8_linear(module: nn.Module, name: str) -> bool:
    """Whether the transformer's submodule `name` is one that `enable_fp8` converts (torchao's
    `filter_fn(module, fully_qualified_name)` signature)."""
    return isinstance(module, nn.Linear) and FP8_LINEAR_NAME.match(name) is not None


def fp8_linear_names(transformer: nn.Module) -> list[str]:
    """Names of the linears `enable_fp8` converts, in module order."""
    return [name for name, module in transformer.named_modules() if is_fp8_linear(module, name)]


def check_fp8_device(device) -> None:
    """One-line LIVEditorError unless `device` is a CUDA GPU with FP8 tensor cores (compute capability
    8.9+: Ada, Hopper or newer)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise LIVEditorError(f"--fp8 needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper); got {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise LIVEditorError(
            f"--fp8 needs a GPU with compute capability 8.9 or newer (Ada, Hopper); {name} has "
            f"{capability[0]}.{capability[1]}"
        )


def fp8_config():
    """torchao's FP8 inference config: float8 e4m3 activations and weights, one scale per row
    (per token for activations, per output feature for weights), activation scales computed on the
    fly."""
    require("torchao")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def enable_fp8(transformer: nn.Module) -> list[str]:
    """Convert the transformer's block linears (`fp8_linear_names`) to FP8 in place; returns their
    names. The transformer must be on its (FP8-capable) CUDA device. Compile after converting."""
    check_fp8_device(next(transformer.parameters()).device)  # first: torchao would not help a GPU without FP8
    torchao = require("torchao")
    names = fp8_linear_names(transformer)
    torchao.quantization.quantize_(transformer, fp8_config(), filter_fn=is_fp8_linear)
    return names


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float32."""
    reference = reference.float()
    return float(torch.linalg.vector_norm(value.float() - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-30))


class LinearSampler:
    """Forward hooks that keep `rows` randomly chosen rows (tokens) of the input and output of each
    named linear, at its first call inside the `with` block, in CPU memory: the same inputs on which
    a converted layer is compared later (`linear_errors`). Use on an eager (not yet compiled) model."""

    def __init__(self, model: nn.Module, names: list[str], rows: int = 256, seed: int = 0):
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"no such modules: {missing[:3]}")
        self._modules = {name: modules[name] for name in names}
        self.rows = rows
        self.seed = seed
        self.samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def _hook(self, name: str):
        def keep(module, args, output):
            if name in self.samples:
                return
            inputs = args[0].reshape(-1, args[0].shape[-1])
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            index = torch.randperm(inputs.shape[0], generator=generator)[: self.rows].to(inputs.device)
            # Kept in CPU memory, so that later peak-memory measurements do not count them.
            self.samples[name] = (inputs[index].detach().cpu(), output.reshape(-1, output.shape[-1])[index].detach().cpu())

        return keep

    def __enter__(self) -> "LinearSampler":
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self._modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def linear_errors(model: nn.Module, samples: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative L2 error of each sampled linear's present output against its recorded output, on
    the recorded input (`LinearSampler.samples`)."""
    modules = dict(model.named_modules())
    errors = {}
    for name, (inputs, outputs) in samples.items():
        module = modules[name]
        errors[name] = relative_l2(module(inputs.to(module.weight.device)).cpu(), outputs)
    return errors


@dataclass
class FP8ErrorReport:
    """FP8 against bf16: `layers` maps each converted linear to the relative L2 error of its output
    on the same input; `output` is the relative L2 error of the whole forward (or step) output."""

    layers: dict[str, float] = field(default_factory=dict)
    output: float | None = None

    @property
    def max_layer(self) -> float:
        return max(self.layers.values())

    @property
    def worst_layer(self) -> str:
        return max(self.layers, key=self.layers.get)

    @property
    def median_layer(self) -> float:
        values = sorted(self.layers.values())
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2

    def summary(self) -> str:
        text = (f"fp8 error vs bf16 (relative L2) over {len(self.layers)} linears: median {self.median_layer:.4f}, "
                f"max {self.max_layer:.4f} ({self.worst_layer})")
        if self.output is not None:
            text += f"; whole output {self.output:.4f}"
        return text

    def to_dict(self) -> dict:
        return dict(layers=self.layers, layer_median=self.median_layer, layer_max=self.max_layer,
                    worst_layer=self.worst_layer, output=self.output)


def measure_fp8_error(transformer: nn.Module, run: Callable[[], torch.Tensor], rows: int = 256) -> FP8ErrorReport:
    """Convert `transformer` to FP8 (`enable_fp8`) and report the error against its bf16 self:
    `run()` (e.g. one forward or one CFG step, returning its output) runs once in bf16 while the
    layer inputs are sampled, then once after the conversion. Call before compiling."""
    names = fp8_linear_names(transformer)
    check_fp8_device(next(transformer.parameters()).device)
    with LinearSampler(transformer, names, rows) as sampler:
        reference = run()
    enable_fp8(transformer)
    layers = linear_errors(transformer, sampler.samples)
    return FP8ErrorReport(layers=layers, output=relative_l2(run(), reference))


# ----- offloading --------------------------------------------------------------------------------


def enable_offload(pipe, mode, device) -> None:
    """Keep the pipeline's weights in CPU memory and bring them to `device` as they run:

    - "model": each component (text encoder, transformer, VAE) moves whole to the GPU while it runs;
      needs the transformer's full size on the GPU (28.6 GB for 14B in bf16).
    - "group": one transformer block (and one block group of the text encoder and VAE) at a time,
      the next one copied from pinned memory on a side CUDA stream while the current one computes;
      the GPU holds about two blocks plus activations.
    - "sequential": every leaf module moves on its own when called: least memory, slowest.

    "group" also runs with `device` = the CPU (no streams, nothing moves), for tests.
    """
    mode = parse_offload(mode)
    device = torch.device(device)
    if mode is None:
        raise LIVEditorError("enable_offload needs a mode: " + ", ".join(OFFLOAD_MODES))
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(**group_offload_kwargs(device))


def group_offload_kwargs(device) -> dict:
    """diffusers' group-offloading settings of mode "group": one block per group, weights pinned in
    CPU memory, the next group copied on a side stream while the current one runs (CUDA only)."""
    device = torch.device(device)
    return dict(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                num_blocks_per_group=1, use_stream=device.type == "cuda")
