"""config.json checking for the runtimes' config dataclasses, without importing torch.

A torch-free path (``enc.models.albert_numpy``) reads configs with exactly the checks the torch
runtimes use; ``enc.models.common`` re-exports these names.
"""

from __future__ import annotations

_TYPE_NAMES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
               "dict": (dict,), "list": (list,)}


class ConfigDict(dict):
    """A config.json's contents, remembering the file it came from (for one-line errors naming it)."""

    path = None


def _accepts(annotation: str, value) -> bool:
    ok = False
    for part in annotation.split("|"):
        part = part.strip()
        base = part.split("[", 1)[0]
        types = _TYPE_NAMES.get(base)
        if types is None:
            return True  # an annotation this check does not know: leave it to the class
        if isinstance(value, bool) and base in ("int", "float"):
            continue  # true/false is not a number here
        ok = ok or isinstance(value, types)
    return ok


def config_errors(from_dict):
    """Decorate a config dataclass's ``from_dict``: each known key must have its field's JSON type
    (``"hidden_size": "16"`` is an error, not a crash later), and every problem becomes one
    :class:`~enc.errors.ConfigError` naming config.json when the dict came from one."""
    import functools
    from dataclasses import fields

    from enc.errors import ConfigError

    @functools.wraps(from_dict)
    def wrapper(cls, d):
        path = getattr(d, "path", None)
        if not isinstance(d, dict):
            raise ConfigError(path, "expected a JSON object")
        for f in fields(cls):
            if f.name in d and isinstance(f.type, str) and not _accepts(f.type, d[f.name]):
                raise ConfigError(path, f"{f.name} must be {f.type.replace(' | None', '').replace('|', 'or')}, "
                                        f"got {d[f.name]!r}")
        try:
            return from_dict.__func__(cls, d) if hasattr(from_dict, "__func__") else from_dict(cls, d)
        except ConfigError as e:
            if e.path is None and path is not None:
                raise ConfigError(path, e.message) from None
            raise
        except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError) as e:
            raise ConfigError(path, f"invalid {cls.__name__.replace('Config', '')} config: {e}") from None

    return wrapper


def check_heads(width: int, heads: int, what: str = "hidden_size") -> None:
    """The attention width must split evenly over the heads: ``ConfigError`` otherwise (one line)."""
    if heads <= 0 or width % heads:
        from enc.errors import ConfigError

        raise ConfigError(None, f"{what} {width} is not a multiple of num_attention_heads {heads}")
