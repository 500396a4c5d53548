"""One exception hierarchy for everything a user can get wrong.

Every message says what to change. Nothing here imports torch.
"""


class ParallelCompError(Exception):
    """Base class: catch this to handle any ParallelComp input or configuration error."""


class ConfigError(ParallelCompError, ValueError):
    """A configuration value is out of range or inconsistent with the model."""


class InputError(ParallelCompError, ValueError):
    """The question, documents or context cannot be processed as given."""


class ModelLoadError(ParallelCompError, RuntimeError):
    """The model could not be found, converted or loaded."""


class ModelNotSupportedError(ParallelCompError, TypeError):
    """The model's architecture lacks what the runtime needs (RoPE positions, a KV cache)."""


class ResourceError(InputError):
    """The run would need more memory than the budget allows (`memory_budget_bytes`); the message
    names the part that dominates and the knob that shrinks it."""


class DistributedError(ParallelCompError, RuntimeError):
    """A distributed run (parallelcomp.distributed) cannot go on: Ray is not installed, no worker
    is left, or a worker did not answer within `timeout_s`."""


class StructuredOutputError(ParallelCompError, RuntimeError):
    """Constrained output (`json_schema=`, tool calls) could not be completed: the token limit
    came first (raise `max_new_tokens`), or the grammar rejected a token."""
