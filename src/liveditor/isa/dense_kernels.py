"""The kernel that computes ISA's exact group on the Triton path, chosen explicitly and recorded.

The exact group is ordinary attention of the sharp query blocks over the kept keys; a dense kernel
(FlashAttention-3 if installed, SDPA's cuDNN / flash / memory-efficient backends) or this package's
Triton kernel computes it. All compute the same function (to rounding); they differ in speed.

Setting, first match wins: `set_dense_kernel(name)`, else the environment variable
`LIVEDITOR_ISA_DENSE_KERNEL`, else "auto":

- "auto": the Triton kernel when the kept keys hold padding (the context's last block is partial,
  a dense kernel would need a key mask); otherwise the fastest dense kernel present, measured once
  per (device, dtype, head dim) before first use and logged at INFO.
- "triton": always the Triton kernel. "sdpa": SDPA with its own backend choice.
- "fa3", "cudnn", "flash", "efficient": that kernel, pinned (reproducible runs). Where it cannot
  run (not installed, not CUDA inputs, a key mask for a kernel that takes none, or the kernel
  refuses the shape) the fallback is logged at WARNING, once per case.

Every decision is recorded: `dense_kernel_choices()`. Under torch.compile the dense kernels are
SDPA's own dispatch (no measurement inside a trace); "triton" and the padding rule still hold.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

DENSE_KERNEL_ENV = "LIVEDITOR_ISA_DENSE_KERNEL"
DENSE_KERNELS = ("fa3", "cudnn", "flash", "efficient")
DENSE_KERNEL_SETTINGS = ("auto", "triton", "sdpa") + DENSE_KERNELS
UNMASKED_ONLY = ("fa3", "flash")  # take no arbitrary key mask

logger = logging.getLogger(__name__)
_setting: str | None = None
_choices: dict[tuple, str] = {}
_warned: set[str] = set()


def _validated(name, source: str) -> str:
    if name not in DENSE_KERNEL_SETTINGS:
        raise ValueError(f"{source} must be one of {', '.join(DENSE_KERNEL_SETTINGS)}, got {name!r}")
    return name


def set_dense_kernel(name: str | None) -> None:
    """Pin the exact group's kernel for this process (None: back to the environment variable or "auto")."""
    global _setting
    _setting = None if name is None else _validated(name, "dense kernel")
    _choices.clear()


def dense_kernel_setting() -> str:
    """The setting in force: set_dense_kernel's, else LIVEDITOR_ISA_DENSE_KERNEL's, else "auto"."""
    if _setting is not None:
        return _setting
    value = os.environ.get(DENSE_KERNEL_ENV)
    if value is None or value.strip() == "":
        return "auto"
    return _validated(value.strip().lower(), DENSE_KERNEL_ENV)


def dense_kernel_choices() -> dict[tuple, str]:
    """Kernels chosen so far: (device, dtype, head dim, masked, setting) -> kernel name."""
    return dict(_choices)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("ISA exact group: %s", message)


def _fa3_installed() -> bool:
    try:
        import flash_attn_interface  # noqa: F401  FlashAttention-3 (Hopper)
    except ImportError:
        return False
    return True


def available_dense_kernels(masked: bool) -> list[str]:
    """Dense kernels that may run the exact group here (fa3 only when installed; with a mask, those taking one)."""
    names = [name for name in DENSE_KERNELS if name != "fa3" or _fa3_installed()]
    return [name for name in names if not (masked and name in UNMASKED_ONLY)]


def run_dense_kernel(name: str, q, k, v, mask=None, scale=None) -> torch.Tensor:
    """Attention `[B, H, N, D]` through one named kernel ("sdpa": SDPA's own choice); raises if it refuses."""
    if name == "fa3":
        from flash_attn_interface import flash_attn_func

        result = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        out = result[0] if isinstance(result, tuple) else result
        return out.transpose(1, 2)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _measure(device, dtype, head_dim: int) -> str:
    """The fastest dense kernel on this device for a mid-size unmasked problem (forward, CUDA events)."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, 8, 8192, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    timings, refused = {}, {}
    for name in available_dense_kernels(masked=False):
        try:
            for _ in range(2):
                run_dense_kernel(name, q, k, v)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(device)  # the kernels' stream, not the current device's
            start.record(stream)
            for _ in range(5):
                run_dense_kernel(name, q, k, v)
            stop.record(stream)
            stop.synchronize()
            timings[name] = start.elapsed_time(stop) / 5
        except RuntimeError as exc:  # this kernel does not run this dtype / head dim on this card
            refused[name] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not timings:
        _warn_once(f"no dense kernel runs {dtype} with head dim {head_dim} on {device} ({refused}); using SDPA's "
                   "own choice")
        return "sdpa"
    best = min(timings, key=timings.get)
    logger.info("ISA exact group: dense kernel %r, measured (forward ms at [1,8,8192,%d] %s: %s%s)", best, head_dim,
                dtype, {name: round(ms, 3) for name, ms in timings.items()},
                f"; refused: {sorted(refused)}" if refused else "")
    return best


def _pinned(name: str, q: torch.Tensor, masked: bool) -> str:
    """A pinned dense kernel, or the logged fallback where it cannot run these inputs."""
    if masked and name in UNMASKED_ONLY:
        _warn_once(f"dense kernel {name!r} takes no key mask, which a partial last context block needs; "
                   "using the Triton kernel")
        return "triton"
    if not q.is_cuda:
        _warn_once(f"dense kernel {name!r} needs CUDA inputs, got {q.device.type}; using SDPA's own choice")
        return "sdpa"
    if name == "fa3" and not _fa3_installed():
        _warn_once("dense kernel 'fa3' is pinned but flash_attn_interface (FlashAttention-3) is not installed; "
                   "using SDPA's own choice")
        return "sdpa"
    return name


def choose_dense_kernel(q: torch.Tensor, masked: bool, setting: str | None = None) -> str:
    """The exact group's kernel for inputs like q: "triton", "sdpa" or one of DENSE_KERNELS.

    masked: the kept keys hold padding (a dense kernel then needs a key mask). setting: overrides
    dense_kernel_setting() for this call.
    """
    setting = dense_kernel_setting() if setting is None else _validated(setting, "dense kernel")
    if setting in ("triton", "sdpa"):
        return setting
    if masked and setting == "auto":
        return "triton"
    if torch.compiler.is_compiling():
        return "triton" if masked and setting in UNMASKED_ONLY else "sdpa"
    key = (str(q.device), q.dtype, q.shape[-1], masked, setting)
    if key not in _choices:
        if setting != "auto":
            _choices[key] = _pinned(setting, q, masked)
        elif not q.is_cuda:
            _choices[key] = "sdpa"
        elif torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
            _warn_once("no dense kernel was measured before CUDA graph capture; using SDPA's own choice for "
                       f"this capture (run one forward before capturing, or set {DENSE_KERNEL_ENV})")
            return "sdpa"
        else:
            _choices[key] = _measure(q.device, q.dtype, q.shape[-1])
    return _choices[key]


def dense_exact_attention(name: str, q, k, v, mask, scale) -> torch.Tensor:
    """The exact group through the chosen dense kernel; a kernel that refuses falls back to SDPA (WARNING)."""
    if name == "sdpa" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    try:
        return run_dense_kernel(name, q, k, v, mask, scale)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _warn_once(f"dense kernel {name!r} refused {q.dtype} inputs of shape {tuple(q.shape)} "
                   f"(key mask: {mask is not None}): {reason}; using SDPA's own choice")
        for key, chosen in _choices.items():  # later calls like this one go to SDPA directly
            if chosen == name and key[:4] == (str(q.device), q.dtype, q.shape[-1], mask is not None):
                _choices[key] = "sdpa"
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
