"""ParallelComp: training-free long-context inference for Hugging Face causal LMs."""

from . import hardware  # noqa: F401 - parallelcomp.hardware: precision and threads per machine
from .config import PRESETS, CalibrationRule, ParallelCompConfig
from .engine import ParallelComp, TextStream
from .errors import (
    ConfigError,
    DistributedError,
    InputError,
    ModelLoadError,
    ModelNotSupportedError,
    ParallelCompError,
    ResourceError,
    StructuredOutputError,
)
from .corpus import Corpus
from .output import ChunkReport, DocumentSpan, GenerationOutput, RunStats, ScoreOutput

__all__ = [
    "PRESETS",
    "CalibrationRule",
    "ChunkReport",
    "ConfigError",
    "Corpus",
    "DistributedError",
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
    "StructuredOutputError",
    "TextStream",
]
