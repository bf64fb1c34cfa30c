"""The one strictness rule every converter here applies (each weight of the target model is filled
with a tensor of its shape, and nothing else is loaded silently) and its one-line messages."""

from __future__ import annotations

import torch

from ...errors import LIVEditorError


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def listing(keys, limit: int = 8) -> str:
    """`a, b, c ... (N in all)`: a one-line list of names."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_weights(
    what: str,
    expected: dict[str, torch.Size],
    mapped: dict[str, object],
    unknown: list[str],
    ignore_unknown_keys: bool = False,
    unknown_hint: str = "",
) -> None:
    """Raise a one-line LIVEditorError unless `mapped` fills every key of `expected` with a tensor of
    its shape. `unknown`: source keys with no place in the target (an error unless ignored)."""
    if unknown and not ignore_unknown_keys:
        raise LIVEditorError(
            f"{what} has {len(unknown)} key(s) with no place in the model: {listing(sorted(unknown))}{unknown_hint}; "
            "pass --ignore-unknown-keys to drop them"
        )
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise LIVEditorError(f"{what} lacks {len(missing)} weight(s) of the model: {listing(missing)}")
    surplus = sorted(set(mapped) - set(expected))
    if surplus:  # a mapping onto a name the model does not have: the converter's fault, said plainly
        raise LIVEditorError(f"{what}: converted names not in the model: {listing(surplus)}")
    not_tensors = [k for k in expected if not isinstance(mapped[k], torch.Tensor)]
    if not_tensors:
        raise LIVEditorError(f"{what}: entries that should be weights are not tensors: {listing(not_tensors)}")
    wrong = [f"{k} {tuple(mapped[k].shape)} (model: {tuple(shape)})" for k, shape in expected.items()
             if tuple(mapped[k].shape) != tuple(shape)]
    if wrong:
        raise LIVEditorError(f"{what} has {len(wrong)} weight(s) of the wrong shape: {listing(wrong, 4)}")
