"""Safe output directories: checked up front, built beside the target, published atomically.

The rules (each refusal is an :class:`~enc.errors.OutputExists` with one line):

- the output may not be the input, lie inside an input directory, or contain an input file;
- it may not be the current directory or one of its parents;
- an existing output is replaced only with ``--force`` and only if it is a previous enc output
  (it holds ``enc_provenance.json``) that holds nothing but what enc wrote there;
- the new output is written into ``.NAME.enc-tmp-PID-XXXX`` beside the target; the old one is moved
  aside only once the new one is complete, so a failed or interrupted run leaves the old output
  as it was; directories created for the output are removed again when the run fails;
- published files and directories get the umask's normal modes (not mkdtemp's 0700 or 0600);
- temp directories left by enc processes that no longer exist (SIGKILL, power loss) are swept
  on the next run that writes beside them, and an output half-way through replacement is put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from enc.errors import OutputExists

PROVENANCE_FILE = "enc_provenance.json"
# key in enc_provenance.json listing the files enc wrote ([{"file": name, ...}]): what --force may delete
OUTPUTS_KEY = "outputs"

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.enc-(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_TEMPDIR_RE = re.compile(r"^enc-[A-Za-z0-9_]+-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def absolute(p: str | Path) -> Path:
    """An absolute, normalised path without resolving the last component's symlink."""
    p = Path(os.path.abspath(os.fspath(p)))
    return p.parent.resolve() / p.name if p.name else p.resolve()


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _source_region(src: Path) -> tuple[Path, Path | None]:
    """(the input path resolved, the directory the input's files live in when that is the input itself)."""
    r = src.resolve()
    if r.is_dir():
        return r, r
    if not r.exists() and any(r.parent.glob(glob_escape(r.name) + ".*")):
        return r, r.parent  # a checkpoint prefix such as dir/model.ckpt-best: its files are beside it
    return r, None


def check_output(out: Path, force: bool, inputs: Iterable[Path] | None = None) -> None:
    """Refuse, before any work, an output that would destroy an input or something not enc's."""
    out_a = absolute(out)
    out_r = out_a.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, out_r):
        raise OutputExists(out, "output is the current directory or contains it; choose a new directory "
                                "(enc replaces an output by renaming it)")
    for src in inputs or []:
        src_r, region = _source_region(Path(src))
        if out_r == src_r:
            raise OutputExists(out, f"output is the input {src}")
        if _inside(src_r, out_r):
            raise OutputExists(out, f"the input {src} is inside the output; --force would delete it")
        if region is not None and _inside(out_r, region):
            raise OutputExists(out, f"output is inside the input {src}; choose a path outside it")
    if not (out_a.exists() or out_a.is_symlink()):
        return
    if not force:
        raise OutputExists(out, "output already exists (use --force to replace a previous enc output)")
    check_replaceable(out_a, shown=out)


def check_replaceable(out: Path, shown: Path | None = None) -> None:
    """``out`` exists: refuse unless it is a previous enc output holding only what enc wrote."""
    shown = shown if shown is not None else out
    if out.is_symlink():
        raise OutputExists(shown, "output is a symbolic link; refusing to replace it")
    if not out.is_dir():
        raise OutputExists(shown, "output exists and is not a directory; refusing to replace it")
    prov = out / PROVENANCE_FILE
    if not any(out.iterdir()):
        return  # an empty directory: nothing to lose
    if not prov.is_file():
        raise OutputExists(shown, f"output exists and is not a previous enc output (no {PROVENANCE_FILE}); "
                                  "refusing to replace it even with --force")
    try:
        listed = json.loads(prov.read_text()).get(OUTPUTS_KEY)
    except (OSError, ValueError, AttributeError):
        raise OutputExists(shown, f"{PROVENANCE_FILE} is unreadable; refusing to replace the output") from None
    if isinstance(listed, list):
        names = {str(e.get("file")) if isinstance(e, dict) else str(e) for e in listed}
        extra = sorted(set(os.listdir(out)) - names - {PROVENANCE_FILE})
        if extra:
            raise OutputExists(shown, f"output holds files enc did not write ({', '.join(extra[:5])}"
                                      f"{' ...' if len(extra) > 5 else ''}); refusing to replace it")


def check_inputs_outside(out: Path, files: Iterable[Path]) -> None:
    """Every file the converter will read (config, vocab, shards...) lies outside the output."""
    out_r = absolute(out).resolve()
    for f in files:
        if _inside(Path(f).resolve(), out_r):
            raise OutputExists(out, f"the input file {f} is inside the output; --force would delete it")


# --------------------------------------------------------------------------- modes


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain mkdir/open would (0777/0666 & ~umask)."""
    mask = current_umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(root, dmode)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), dmode)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


# --------------------------------------------------------------------------- stale temp dirs


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _mine(p: Path) -> bool:
    try:
        return p.lstat().st_uid == os.getuid()
    except (OSError, AttributeError):
        return False


def sweep_stale(parent: Path) -> list[str]:
    """Remove the temp dirs of dead enc processes in ``parent``; put back an output a dead run had moved aside.

    Returns one sentence per thing done or left alone, for the user.
    """
    notes: list[str] = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return notes
    for p in sorted(entries):
        m = _TMP_RE.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or not _mine(p) or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old":
            target = p.parent / m["name"]
            if not target.exists():
                try:
                    os.replace(p, target)
                    notes.append(f"restored {target} from {p.name}, left by an enc run (pid {m['pid']}) that "
                                 "was killed while replacing it")
                except OSError as e:
                    notes.append(f"could not restore {target} from {p}: {e}")
                continue
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            notes.append(f"could not remove {p}, left by an enc run (pid {m['pid']}) that no longer exists")
        else:
            notes.append(f"removed {p}, left by an enc run (pid {m['pid']}) that no longer exists")
    return notes


def sweep_stale_tempdirs() -> list[str]:
    """Remove ``enc-*-PID-*`` extraction dirs in the system temp dir whose enc process is gone."""
    notes: list[str] = []
    base = Path(tempfile.gettempdir())
    try:
        entries = list(base.iterdir())
    except OSError:
        return notes
    for p in sorted(entries):
        m = _TEMPDIR_RE.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or not _mine(p) or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            notes.append(f"removed {p}, left by an enc run (pid {m['pid']}) that no longer exists")
    return notes


def make_tempdir(kind: str) -> Path:
    """A private temp dir named ``enc-KIND-PID-XXXX`` (so a later run can tell when its owner is gone)."""
    return Path(tempfile.mkdtemp(prefix=f"enc-{kind}-{os.getpid()}-"))


# --------------------------------------------------------------------------- publishing


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (delivered afterwards) while a cleanup or a rename pair runs."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _missing_parents(d: Path) -> list[Path]:
    out = []
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out  # deepest first


def _remove_created(created: list[Path]) -> None:
    for d in created:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, marker: str | None = PROVENANCE_FILE) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success publish it as ``out``, on failure remove it.

    With ``force`` an existing ``out`` is replaced, but only if it holds ``marker`` (a previous enc
    output); it is moved aside after the new directory is complete and deleted after the rename.
    Parent directories this call created are removed again on failure.
    """
    out = absolute(out)
    created = _missing_parents(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.enc-tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        _remove_created(created)
        raise OutputExists(out, f"cannot create the output: {e.strerror or e}") from None
    try:
        yield tmp
        normalize_modes(tmp)
        with signals_held():
            _publish(tmp, out, force, marker)
    except BaseException:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(created)
        raise


def _publish(tmp: Path, out: Path, force: bool, marker: str | None) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:
        raise OutputExists(out, "output appeared while converting (use --force to replace it)")
    if marker is not None:
        check_replaceable(out)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.enc-old-{os.getpid()}-", dir=out.parent))
    os.rmdir(old)  # a unique name; os.replace needs it absent (or empty) for a directory
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
