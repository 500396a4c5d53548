"""ParallelComp: training-free long-context inference for Hugging Face causal LMs.

The names below are imported on first use (PEP 562), so that `import parallelcomp.cli` (the
`parallelcomp` command's `--help`, its argument errors) does not pay for torch and transformers,
about 4 s here; `from parallelcomp import ParallelComp` imports them as before. Submodules
(`parallelcomp.hardware`: precision and threads per machine) load on attribute access too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
_HOMES = ("errors", "output", "config", "corpus", "engine")  # where __all__'s names live, the light ones first


def __getattr__(name: str):
    if name in __all__:
        value = next(getattr(module, name) for module in map(_submodule, _HOMES) if hasattr(module, name))
    else:
        try:
            value = _submodule(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists but one of its imports does not
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _submodule(name: str):
    return importlib.import_module(f".{name}", __name__)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .config import PRESETS, CalibrationRule, ParallelCompConfig
    from .corpus import Corpus
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
    from .output import ChunkReport, DocumentSpan, GenerationOutput, RunStats, ScoreOutput
