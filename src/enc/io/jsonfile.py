"""Read a JSON object from a config file, with one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from enc.errors import ConfigError


def read_json_object(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a JSON object")
    return data
