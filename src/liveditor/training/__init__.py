"""Training: config, Wan flow-matching objective, EMA and the accelerate-based loop.

    from liveditor.training import load_config, train
    result = train(load_config("configs/tiny-shapeedit.toml"))
"""

from .config import ConfigError, TrainConfig, load_config
from .loop import TrainResult, build_components, encode_instructions, export_pipeline, train

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "build_components",
    "encode_instructions",
    "export_pipeline",
    "load_config",
    "train",
]
