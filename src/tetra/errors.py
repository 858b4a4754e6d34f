"""The user-facing error types: anything the user can fix raises one of these.

The CLI turns a TetraError into a one-paragraph message and exit code 2, with no traceback.
"""


class TetraError(Exception):
    """A problem with the user's input, named together with the fix."""


class ConfigError(TetraError):
    """A configuration (tetra TOML, Hugging Face config.json, CLI option) is invalid."""


class DataError(TetraError):
    """Input data (text, tokens, tokenizer files) is missing or malformed."""


class CheckpointError(TetraError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class ResourceError(TetraError):
    """The run needs more of the machine (memory, devices) than it has; the message says what would fit."""
