"""LIVEditor's transformer and its self-attention processor."""

from .attention_processor import AttentionTimer, InContextLayout, LIVEditorAttnProcessor
from .transformer_liveditor import MODEL_PRESETS, LIVEditorTransformer3DModel, LIVEditorTransformerBlock

__all__ = [
    "AttentionTimer",
    "InContextLayout",
    "LIVEditorAttnProcessor",
    "LIVEditorTransformer3DModel",
    "LIVEditorTransformerBlock",
    "MODEL_PRESETS",
]
