"""LIVEditor's editing pipeline.

Names are imported on first use, so that `liveditor.pipelines.loading` (folder checks) and the
command line's argument checks run without importing torch or diffusers.
"""

import importlib

_EXPORTS = {
    "check_pipeline_folder": "loading",
    "default_model_path": "loading",
    "load_pipeline": "loading",
    "LIVEDITOR_14B_BUCKETS": "pipeline_liveditor",
    "WAN_NEGATIVE_PROMPT": "pipeline_liveditor",
    "LIVEditorPipeline": "pipeline_liveditor",
    "LIVEditorPipelineOutput": "pipeline_liveditor",
    "flow_unipc_scheduler": "pipeline_liveditor",
    "run_edit": "edit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
