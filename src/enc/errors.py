"""One exception type per kind of failure. Each carries the path it is about.

The CLI turns any :class:`EncError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path


class EncError(Exception):
    """Base class: a user-facing failure about a file (or no file)."""

    kind = "error"

    def __init__(self, path: str | Path | None, message: str):
        self.path = Path(path) if path is not None else None
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.message}"


class FormatError(EncError):
    """The input is not in a format enc knows, or not in the format it claims to be."""

    kind = "format"


class CorruptCheckpoint(EncError):
    """The file is in a known format but truncated, damaged or inconsistent (bad magic, CRC...)."""

    kind = "corrupt"


class ConfigError(EncError):
    """A configuration file is missing, invalid, or disagrees with the tensors."""

    kind = "config"


class MappingError(EncError):
    """A source key no rule maps, or an expected output key nothing produced."""

    kind = "mapping"


class OutputExists(EncError):
    """The output path exists (and --force was not given) or is inside the input."""

    kind = "output"


class UnsafeInput(EncError):
    """A pickle with a disallowed global, an archive member escaping its root, a size bomb."""

    kind = "unsafe"


class MissingFile(EncError):
    """A required file is absent."""

    kind = "missing"


class UsageError(EncError):
    """Arguments that do not fit together (unknown task, bad flag value...)."""

    kind = "usage"
