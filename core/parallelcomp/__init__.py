"""ParallelComp: training-free long-context inference for Hugging Face causal LMs."""

from .config import PRESETS, CalibrationRule, ParallelCompConfig
from .engine import ParallelComp, TextStream
from .errors import (
    ConfigError,
    InputError,
    ModelLoadError,
    ModelNotSupportedError,
    ParallelCompError,
    ResourceError,
)
from .output import ChunkReport, DocumentSpan, GenerationOutput, RunStats, ScoreOutput

__all__ = [
    "PRESETS",
    "CalibrationRule",
    "ChunkReport",
    "ConfigError",
    "DocumentSpan",
    "GenerationOutput",
    "InputError",
    "ModelLoadError",
    "ModelNotSupportedError",
    "ParallelComp",
    "ParallelCompConfig",
    "ParallelCompError",
    "ResourceError",
    "RunStats",
    "ScoreOutput",
    "TextStream",
]
