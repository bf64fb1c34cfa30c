"""LIVEditor's transformer and its self-attention processor."""

from .attention_processor import AttentionEvent, AttentionTimer, LIVEditorAttnProcessor, SelfAttentionCall
from .sequence_parallel import SequenceShard
from .transformer_liveditor import MODEL_PRESETS, LIVEditorTransformer3DModel, LIVEditorTransformerBlock

# Imported here because diffusers loads a pipeline component only from an already imported module.
from .tiny_codec import SpaceToDepthVideoCodec

__all__ = [
    "AttentionEvent",
    "AttentionTimer",
    "LIVEditorAttnProcessor",
    "LIVEditorTransformer3DModel",
    "LIVEditorTransformerBlock",
    "MODEL_PRESETS",
    "SelfAttentionCall",
    "SequenceShard",
    "SpaceToDepthVideoCodec",
]
