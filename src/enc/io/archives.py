"""Safe archive reading: no path traversal, no links, no devices, bounded size."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from enc.errors import CorruptCheckpoint, UnsafeInput

# Refuse archives that would expand past this (override with ENC_MAX_EXTRACT_BYTES).
DEFAULT_MAX_BYTES = 512 * 2**30


def max_bytes() -> int:
    return int(os.environ.get("ENC_MAX_EXTRACT_BYTES", DEFAULT_MAX_BYTES))


def is_tarball(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz"))


def is_zip(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


# RuntimeError: zipfile's "File ... is encrypted, password required" (one flipped flag bit)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error, NotImplementedError,
              RuntimeError)


def zip_reason(e: BaseException) -> str:
    """One short line for a zip/zlib failure (zipfile may quote kilobytes of the damaged header)."""
    text = str(e).strip()
    if text.startswith("File name in directory"):
        return "a member's local header does not match the central directory (damaged archive)"
    if "Bad magic number for file header" in text:
        return "a member's local header is damaged (bad signature)"
    if isinstance(e, zlib.error) or text.startswith("Error -3"):
        return "compressed data is damaged"
    if "is encrypted" in text:
        return "a member is marked encrypted (damaged, or not written by torch/NGC)"
    if "Bad CRC-32" in text:
        return f"CRC mismatch ({text.splitlines()[0][:120]})"
    return _reason(e)


def _reason(e: BaseException) -> str:
    """One line for an archive library's error (tarfile lists every method it tried, one per line)."""
    text = str(e).strip()
    if "could not be opened successfully" in text:
        return "not a tar archive, or a damaged one (tried gzip, bzip2, xz and plain tar)"
    first = text.splitlines()[0].rstrip(":") if text else type(e).__name__
    return first[:200]


def check_member_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise UnsafeInput(archive, f"archive member {name!r} escapes the extraction directory")
    return p


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path) as tf:
            members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptCheckpoint(path, f"cannot read tar archive: {_reason(e)}") from None
    for m in members:
        check_member_name(path, m.name)
        if not (m.isfile() or m.isdir()):
            raise UnsafeInput(path, f"archive member {m.name!r} is a link or special file; refusing")
    total = sum(m.size for m in members if m.isfile())
    if total > max_bytes():
        raise UnsafeInput(path, f"archive expands to {total} bytes, over the {max_bytes()} limit (ENC_MAX_EXTRACT_BYTES)")
    return members


def extract_tar(path: Path, dest: Path) -> Path:
    """Extract regular files and directories of a (compressed) tarball into ``dest``."""
    members = tar_members(path)
    total = sum(m.size for m in members if m.isfile())
    free = shutil.disk_usage(dest).free
    if total > free:
        raise UnsafeInput(path, f"archive needs {total} bytes but only {free} are free in {dest}")
    try:
        with tarfile.open(path) as tf:
            for m in members:
                target = dest / check_member_name(path, m.name)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    continue
                with src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 22)
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(path, f"cannot extract tar archive: {_reason(e)}") from None
    return dest


def zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except ZIP_ERRORS as e:
        raise CorruptCheckpoint(path, f"cannot read zip archive: {zip_reason(e)}") from None
    for i in infos:
        check_member_name(path, i.filename)
    total = sum(i.file_size for i in infos)
    if total > max_bytes():
        raise UnsafeInput(path, f"archive expands to {total} bytes, over the {max_bytes()} limit (ENC_MAX_EXTRACT_BYTES)")
    return [i.filename for i in infos]


class TempDir:
    """A temp directory that is always removed (context manager or close()).

    Named ``enc-KIND-PID-XXXX``: if the process is killed (SIGKILL) before it can remove it, the
    next enc run sees that PID is gone and removes it (:func:`enc.io.publish.sweep_stale_tempdirs`).
    """

    def __init__(self, prefix: str = "enc-"):
        from enc.io.publish import make_tempdir

        kind = re.sub(r"[^A-Za-z0-9_]", "", prefix.removeprefix("enc-")) or "tmp"
        self.path = make_tempdir(kind)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.close()
