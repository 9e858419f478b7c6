"""Finding and opening the files of a Megatron-LM checkpoint: NGC zips, training directories, bare .pt.

Layouts (Megatron ``megatron/checkpointing.py``)::

    <save>/latest_checkpointed_iteration.txt        "release" or an iteration number
    <save>/release/ or <save>/iter_0001000/
        mp_rank_{TP:02d}/model_optim_rng.pt          pipeline parallel size 1
        mp_rank_{TP:02d}_{PP:03d}/model_optim_rng.pt pipeline parallel size > 1

An NGC zip holds the same tree (``release/mp_rank_00/model_optim_rng.pt``, maybe under a top
folder). Members stored uncompressed are read in place; a compressed member is extracted to a temp
directory that :meth:`MegatronFiles.close` always removes (random access needs a plain file).
"""

from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from enc.errors import ConfigError, CorruptCheckpoint, FormatError, MissingFile
from enc.io.archives import ZIP_ERRORS, TempDir, is_zip, zip_names, zip_reason
from enc.io.fastcopy import enabled as fastcopy_enabled
from enc.io.megatron_pickle import ByteRange, load_lazy, zip_member_offset

CKPT_NAME = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
ITER_DIR = re.compile(r"^(release|iter_\d{7,})$")
DIST_MARKERS = (".metadata", "metadata.json", "common.pt")


@dataclass(frozen=True)
class RankFile:
    tp: int
    pp: int
    name: str  # the rank directory's name, e.g. "mp_rank_01_002": prefixes the source keys
    source: ByteRange


def parse_rank(name: str) -> tuple[int, int | None, int | None] | None:
    m = RANK_DIR.match(name)
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None), (int(m.group(3)) if m.group(3) else None)


def _tracker_dir(text: str, where: str) -> str:
    value = text.strip()
    if value == "release":
        return "release"
    if value.isdigit():
        return f"iter_{int(value):07d}"
    raise CorruptCheckpoint(where, f"{TRACKER} should hold 'release' or an iteration number, not {value[:40]!r}")


def _pick_iteration(candidates: list[str], tracker: str | None, where: str) -> str:
    """The iteration directory: the tracker's, else release/, else the newest iter_*."""
    if tracker is not None:
        if tracker not in candidates:
            raise MissingFile(where, f"{TRACKER} names {tracker}/, which holds no mp_rank_XX/{CKPT_NAME}")
        return tracker
    names = {PurePosixPath(c).name: c for c in candidates}
    if len(candidates) == 1:
        return candidates[0]
    if "release" in names:
        return names["release"]
    iters = sorted((c for c in candidates if PurePosixPath(c).name.startswith("iter_")),
                   key=lambda c: int(PurePosixPath(c).name[5:]))
    if iters:
        return iters[-1]
    raise FormatError(where, f"several checkpoints found ({', '.join(candidates[:4])}); point at one directory")


def _check_ranks(found: dict[tuple[int, int], Any], where: str) -> tuple[int, int]:
    tps = {t for t, _ in found}
    pps = {p for _, p in found}
    tp_size, pp_size = max(tps) + 1, max(pps) + 1
    for t in range(tp_size):
        for p in range(pp_size):
            if (t, p) not in found:
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp_size > 1 else "")
                raise MissingFile(where, f"tensor/pipeline-parallel rank {name} is missing "
                                         f"(found {len(found)} of {tp_size}x{pp_size} ranks)")
    return tp_size, pp_size


class MegatronFiles:
    """Every ``mp_rank_*`` file of one iteration of a checkpoint, opened lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp: TempDir | None = None
        self.iteration_dir = ""
        self.ranks: dict[tuple[int, int], RankFile] = {}
        try:
            if self.path.is_file() and is_zip(self.path) and self.path.suffix != ".pt":
                self._open_zip()
            elif self.path.is_dir():
                self._open_dir()
            elif self.path.is_file():
                self.ranks[(0, 0)] = RankFile(0, 0, "mp_rank_00", ByteRange.whole_file(self.path))
            else:
                raise MissingFile(self.path, "no such file or directory")
            self.tp_size, self.pp_size = _check_ranks(self.ranks, str(self.path))
        except BaseException:
            self.close()  # a member already extracted to a temp dir must not outlive the failure
            raise
        self._trees: dict[tuple[int, int], dict] = {}

    # ------------------------------------------------------------------ directories
    def _open_dir(self) -> None:
        root = self.path
        if (root / CKPT_NAME).is_file() and not any(parse_rank(p.name) for p in root.iterdir() if p.is_dir()):
            self.ranks[(0, 0)] = RankFile(0, 0, "mp_rank_00", ByteRange.whole_file(root / CKPT_NAME))
            return
        tracker = None
        if (root / TRACKER).exists() and not (root / TRACKER).is_file():
            raise FormatError(root / TRACKER, "the tracker file is not a regular file (a directory?)")
        if (root / TRACKER).is_file():
            tracker = _tracker_dir((root / TRACKER).read_text(errors="replace"), str(root / TRACKER))
        candidates = [d.name for d in sorted(root.iterdir()) if d.is_dir() and ITER_DIR.match(d.name)
                      and any(parse_rank(r.name) for r in d.iterdir() if r.is_dir())]
        if any(parse_rank(d.name) for d in root.iterdir() if d.is_dir()):
            it_dir = root  # the user pointed at the iteration directory itself
        elif candidates or tracker:
            it_dir = root / _pick_iteration(candidates, tracker, str(root))
        else:
            _no_checkpoint(root, [p.name for p in root.rglob("*") if p.is_file()][:2000])
        self.iteration_dir = it_dir.name if it_dir != root else ""
        found: dict[tuple[int, int], RankFile] = {}
        for d in sorted(it_dir.iterdir()):
            r = parse_rank(d.name) if d.is_dir() else None
            if r is None:
                continue
            _reject_expert_parallel(r, d)
            if not (d / CKPT_NAME).is_file():
                raise MissingFile(d / CKPT_NAME, "rank directory without its checkpoint file")
            found[(r[0], r[1] or 0)] = RankFile(r[0], r[1] or 0, d.name, ByteRange.whole_file(d / CKPT_NAME))
        if not found:
            _no_checkpoint(it_dir, [p.name for p in it_dir.rglob("*") if p.is_file()][:2000])
        _reject_mixed_pp(found, it_dir)
        self.ranks = found

    # ------------------------------------------------------------------ zips
    def _open_zip(self) -> None:
        names = zip_names(self.path)  # refuses ../ and absolute members, size bombs
        members = [PurePosixPath(n) for n in names if not n.endswith("/")]
        ckpts = [m for m in members if m.name == CKPT_NAME and parse_rank(m.parent.name)]
        trackers = [m for m in members if m.name == TRACKER]
        if not ckpts:
            if len(members) == 1 and members[0].suffix == ".pt":
                self.ranks[(0, 0)] = RankFile(0, 0, "mp_rank_00", self._member_range(str(members[0])))
                return
            _no_checkpoint(self.path, [str(m) for m in members])
        by_iter: dict[str, list[PurePosixPath]] = {}
        for m in ckpts:
            by_iter.setdefault(str(m.parent.parent), []).append(m)
        tracker = None
        if trackers:
            t = sorted(trackers, key=lambda m: len(m.parts))[0]
            try:
                with zipfile.ZipFile(self.path) as zf:
                    text = zf.read(str(t)).decode(errors="replace")
            except ZIP_ERRORS as e:
                raise CorruptCheckpoint(f"{self.path}:{t}", f"cannot read zip member: {zip_reason(e)}") from None
            sub = _tracker_dir(text, f"{self.path}:{t}")
            tracker = str(t.parent / sub) if str(t.parent) != "." else sub
        chosen = _pick_iteration(sorted(by_iter), tracker, str(self.path))
        self.iteration_dir = chosen if chosen != "." else ""
        found: dict[tuple[int, int], RankFile] = {}
        for m in by_iter[chosen]:
            r = parse_rank(m.parent.name)
            assert r is not None
            _reject_expert_parallel(r, f"{self.path}:{m}")
            found[(r[0], r[1] or 0)] = RankFile(r[0], r[1] or 0, m.parent.name, self._member_range(str(m)))
        _reject_mixed_pp(found, self.path)
        self.ranks = found

    def _member_range(self, name: str) -> ByteRange:
        label = f"{self.path}:{name}"
        try:
            with zipfile.ZipFile(self.path) as zf:
                info = zf.getinfo(name)
                if info.flag_bits & 0x1:
                    raise FormatError(label, "encrypted zip members are not supported")
                if info.compress_type == zipfile.ZIP_STORED:
                    with open(self.path, "rb") as f:
                        offset = zip_member_offset(f, info)  # type: ignore[arg-type]
                    if offset + info.file_size > self.path.stat().st_size:
                        raise CorruptCheckpoint(label, "truncated zip: the member runs past the end of the file")
                    return ByteRange(self.path, offset, info.file_size, label, info.CRC)
                # compressed: random access needs a plain file; extract this member to a temp dir
                if self._tmp is None:
                    self._tmp = TempDir("enc-megatron-")
                target = self._tmp.path / name.replace("/", "__")
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                return ByteRange.whole_file(target, label)
        except ZIP_ERRORS as e:
            raise CorruptCheckpoint(label, f"cannot read zip member: {zip_reason(e)}") from None

    def verify_members(self) -> None:
        """Check the zip CRC-32 of every rank file STORED in the zip in torch's legacy format (NGC's 2020
        releases): that format has no checksum of its own, so a flipped bit in the weights would pass
        unseen. (The zip torch format's storages are checked one by one as they are read; compressed
        members are checked by zipfile when they are extracted.) Raises CorruptCheckpoint on a mismatch."""
        from enc.io.crc import crc32
        from enc.io.fastcopy import _mapped

        for rf in self.ranks.values():
            src = rf.source
            if src.crc32 is None:
                continue
            with open(src.path, "rb") as f:
                f.seek(src.offset)
                if f.read(1) != b"\x80":  # not the legacy pickle format
                    continue
                got = 0
                for view in _mapped(f.fileno(), src.offset, src.offset + src.size):
                    got = crc32(view, got)
            if got != src.crc32:
                raise CorruptCheckpoint(src.label, f"CRC mismatch for the zip member (stored {src.crc32:#010x}, "
                                                   f"computed {got:#010x}): the download is damaged")

    # ------------------------------------------------------------------ contents
    def tree(self, tp: int, pp: int) -> dict:
        """The unpickled top-level dict of one rank (tensors as StoredTensor, nothing read)."""
        key = (tp, pp)
        if key not in self._trees:
            rf = self.ranks[key]
            # torch-free unpickling (enc.io.torch_meta) unless the byte path is off (ENC_FASTCOPY=0)
            tree = load_lazy(rf.source, torch_free=fastcopy_enabled())
            if not isinstance(tree, dict):
                raise FormatError(rf.source.label, f"expected a dict at the top of the checkpoint, got {type(tree).__name__}")
            self._trees[key] = tree
        return self._trees[key]

    def args(self) -> Any | None:
        return self.tree(0, 0).get("args")

    def checkpoint_version(self) -> float:
        v = self.tree(0, 0).get("checkpoint_version", 0)
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(self.ranks[(0, 0)].source.label, f"checkpoint_version {v!r} is not a number") from None

    def files(self) -> list[Path]:
        if self.path.is_dir():
            return [rf.source.path for rf in self.ranks.values()]
        return [self.path]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None


def _reject_expert_parallel(r: tuple[int, int | None, int | None], where) -> None:
    if r[2] is not None:
        raise FormatError(where, "expert-parallel checkpoints (mp_rank_XX_YYY_ZZZ) are not supported")


def _reject_mixed_pp(found: dict[tuple[int, int], RankFile], where) -> None:
    with_pp = {rf.name for rf in found.values() if (parse_rank(rf.name) or (0, None, None))[1] is not None}
    if with_pp and len(with_pp) != len(found):
        raise FormatError(where, "rank directories mix mp_rank_XX and mp_rank_XX_YYY names")


def _no_checkpoint(where: Path, members: list[str]) -> None:
    names = [PurePosixPath(m).name for m in members]
    if any(n.endswith(".distcp") for n in names) or any(n in DIST_MARKERS for n in names):
        raise FormatError(where, "a torch_dist (distributed) Megatron checkpoint; enc reads the legacy per-rank "
                                 "format: re-save it with --ckpt-format torch")
    ranks = sorted({PurePosixPath(m).parent.name for m in members if parse_rank(PurePosixPath(m).parent.name)})
    if ranks:
        raise MissingFile(where, f"no {CKPT_NAME} in {', '.join(ranks[:3])}")
    raise MissingFile(where, f"no Megatron checkpoint inside (expected [release|iter_N/]mp_rank_XX/{CKPT_NAME})")
