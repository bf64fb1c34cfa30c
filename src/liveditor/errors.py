"""Errors that the command line reports as one line instead of a traceback."""

from __future__ import annotations

import importlib


class LIVEditorError(Exception):
    """A user-facing problem: bad input, a missing file or model component."""


class InvalidArgumentError(LIVEditorError, ValueError):
    """A bad argument value given by a user (also a ValueError, for Python callers)."""


class InputNotFoundError(LIVEditorError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class MissingDependencyError(LIVEditorError):
    """An optional dependency is not installed; the message names the `pip install` that fixes it."""


# Top-level module -> the extra of this package that installs it.
OPTIONAL_DEPENDENCIES = {
    "diffusers": "editor",
    "transformers": "editor",
    "accelerate": "editor",
    "safetensors": "editor",
    "sentencepiece": "editor",
    "tokenizers": "editor",
    "imageio": "editor",
    "imageio_ffmpeg": "editor",
    "PIL": "editor",
    "yaml": "editor",
    "tomli": "editor",
    "ftfy": "editor",
    "triton": "triton",
    "torchao": "fp8",
    "gradio": "web",
}


def missing_dependency_message(module_name: str) -> str | None:
    """The one-line fix for a missing optional dependency, or None if `module_name` is not one."""
    top = (module_name or "").split(".")[0]
    extra = OPTIONAL_DEPENDENCIES.get(top)
    if extra is None:
        return None
    return f"the optional dependency {top!r} is not installed: pip install 'liveditor[{extra}]'"


def require(module_name: str):
    """Import an optional dependency, or raise MissingDependencyError naming the fix."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        message = missing_dependency_message(module_name) or f"cannot import {module_name} ({exc})"
        raise MissingDependencyError(message) from exc
