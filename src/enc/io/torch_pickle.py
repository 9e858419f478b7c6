"""Safe ``torch.load``: ``weights_only=True`` plus an explicit allow-list; never executes pickled code.

Anything outside torch's tensor types, plain containers and the allow-list is refused with
:class:`~enc.errors.UnsafeInput` naming the global the file asked for.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from enc.errors import CorruptCheckpoint, UnsafeInput


def safe_torch_load(
    source: str | Path | IO[bytes],
    *,
    mmap: bool = False,
    allow: Sequence[Any] = (),
    path_for_errors: str | Path | None = None,
) -> Any:
    """Load a torch checkpoint with weights_only=True; ``allow`` lists extra classes/functions permitted.

    ``allow`` entries may be objects or ``(object, "module.qualname")`` pairs (a stand-in class
    registered under the name the pickle refers to).
    """
    where = path_for_errors or (source if isinstance(source, (str, Path)) else getattr(source, "name", None))
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        from enc.errors import MissingFile

        raise MissingFile(source, "file not found")
    if isinstance(source, (str, Path)):
        check_torch_zip(Path(source))
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "not an allowed global" in msg or "GLOBAL" in msg:
            detail = _global_name(msg)
            raise UnsafeInput(where, f"pickle refers to {detail}, which is not on enc's allow-list; refusing to load it "
                                     "(nothing was executed)") from None
        if "Unsupported operand" in msg:
            op = msg.split("Unsupported operand", 1)[1].split()[0].strip(".,") if "Unsupported operand " in msg else "?"
            raise UnsafeInput(where, f"pickle uses an instruction (opcode {op}) the weights-only loader does not allow; "
                                     "refusing to load it (nothing was executed)") from None
        raise CorruptCheckpoint(where, f"corrupted pickle: {_first_line(msg)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, struct.error) as e:
        raise CorruptCheckpoint(where, f"truncated or corrupted torch checkpoint: {_first_line(str(e))}") from None


def check_torch_zip(path: Path) -> None:
    """torch writes every zip member STORED (uncompressed, for mmap). A compressed member (a DEFLATED
    data.pkl padded with zeros inflates to gigabytes) is refused before torch inflates it."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CorruptCheckpoint(path, f"truncated or corrupted torch checkpoint: {_first_line(str(e))}") from None
    for i in infos:
        if i.flag_bits & 0x1:
            raise CorruptCheckpoint(path, f"zip member {i.filename} is marked encrypted (damaged, or not written by torch)")
        if i.compress_type != zipfile.ZIP_STORED:
            raise UnsafeInput(path, f"zip member {i.filename} is compressed; torch never writes that "
                                    "(a decompression bomb?), refusing it")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:200] if msg.strip() else "unreadable"


def _global_name(msg: str) -> str:
    for line in msg.splitlines():
        if "GLOBAL" in line and " " in line:
            for tok in line.replace(",", " ").split():
                if "." in tok and not tok.startswith(("torch.", "http")) and tok.count(".") < 6:
                    return tok.strip("`'\"")
    return "a disallowed global"
