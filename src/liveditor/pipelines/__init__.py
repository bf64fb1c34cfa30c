"""LIVEditor's editing pipeline."""

from .loading import check_pipeline_folder, default_model_path, load_pipeline
from .pipeline_liveditor import (
    LIVEDITOR_14B_BUCKETS,
    WAN_NEGATIVE_PROMPT,
    LIVEditorPipeline,
    LIVEditorPipelineOutput,
    flow_unipc_scheduler,
)

__all__ = [
    "LIVEDITOR_14B_BUCKETS",
    "WAN_NEGATIVE_PROMPT",
    "LIVEditorPipeline",
    "LIVEditorPipelineOutput",
    "check_pipeline_folder",
    "default_model_path",
    "flow_unipc_scheduler",
    "load_pipeline",
]
