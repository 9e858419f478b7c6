"""Finding and reading the files of a studio-ousia LUKE / mLUKE release or pretraining run.

Layouts (``luke/utils/model_utils.py``, ``pretraining.md``)::

    luke_base_500k/                        a release (directory or .tar.gz)
        pytorch_model.bin                  plain state_dict
        metadata.json                      {"model_config": {...}, "max_seq_length", "max_mention_length", ...}
        entity_vocab.tsv                   title<TAB>count, id = line number (LUKE)
    OUTPUT_DIR/                            a (m)LUKE pretraining run (DeepSpeed)
        metadata.json, entity_vocab.jsonl  {"id", "entities": [[title, lang], ...], "count"} per line
        checkpoints/latest                 the newest tag, e.g. "epoch20"
        checkpoints/epoch20/mp_rank_00_model_states.pt   weights under ["module"]

SRC may be any of: the release directory or tarball, the run directory, a ``checkpoints/<tag>``
directory, or the checkpoint file itself; ``metadata.json`` and the entity vocabulary are looked
for beside the checkpoint and up to two directories above it.

Pickles are read by enc's weights-only unpickler (:mod:`enc.io.megatron_pickle`): tensors stay on
disk until asked for; DeepSpeed's non-tensor entries (shapes, sets, dicts, strings) are plain data,
and any pickled class or function outside the allow-list is refused before anything runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from enc.errors import ConfigError, CorruptCheckpoint, FormatError, MissingFile
from enc.io.archives import TempDir, extract_tar, is_tarball, tar_members
from enc.io.crc import crc32
from enc.io.jsonfile import read_json_object
from enc.io.lazy import LazyTensor
from enc.io.megatron_pickle import ByteRange, StoredTensor, iter_tensors, load_lazy

PLAIN_NAME = "pytorch_model.bin"
DEEPSPEED_NAME = "mp_rank_00_model_states.pt"
METADATA = "metadata.json"
TSV_VOCAB = "entity_vocab.tsv"
JSONL_VOCAB = "entity_vocab.jsonl"
SPECIAL_ENTITIES = ("[MASK]", "[PAD]", "[UNK]")
_EPOCH = re.compile(r"^(?:epoch|global_step|step)?(\d+)$")


def _up(start: Path, levels: int = 2) -> list[Path]:
    out = [start]
    for _ in range(levels):
        if out[-1].parent == out[-1]:
            break
        out.append(out[-1].parent)
    return out


def _find_checkpoint(root: Path) -> Path | None:
    """The checkpoint file under a directory (release dir, run dir, checkpoints/ or checkpoints/<tag>)."""
    for name in (PLAIN_NAME, DEEPSPEED_NAME):
        if (root / name).is_file():
            return root / name
    ck = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    tags = [d for d in sorted(ck.iterdir()) if d.is_dir() and (d / DEEPSPEED_NAME).is_file()] if ck.is_dir() else []
    if not tags:
        return None
    latest = ck / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not (ck / tag / DEEPSPEED_NAME).is_file():
            raise MissingFile(latest, f"names tag {tag[:60]!r}, but {ck / tag / DEEPSPEED_NAME} does not exist")
        return ck / tag / DEEPSPEED_NAME
    if len(tags) == 1:
        return tags[0] / DEEPSPEED_NAME
    numbered = [(int(m.group(1)), d) for d in tags if (m := _EPOCH.match(d.name))]
    if len(numbered) == len(tags):
        return max(numbered)[1] / DEEPSPEED_NAME
    raise FormatError(ck, f"several checkpoints ({', '.join(d.name for d in tags[:4])}) and no 'latest' file: "
                          "point at one of them")


def looks_like_luke(path: Path) -> bool:
    """Cheap detection: a checkpoint plus a metadata.json whose model_config has an entity vocabulary."""
    try:
        path = Path(path)
        if is_tarball(path):
            names = {Path(m.name).name for m in tar_members(path)}
            return METADATA in names and PLAIN_NAME in names and bool({TSV_VOCAB, JSONL_VOCAB} & names)
        ckpt = path if path.is_file() else _find_checkpoint(path) if path.is_dir() else None
        if ckpt is None or ckpt.name not in (PLAIN_NAME, DEEPSPEED_NAME) and ckpt.suffix not in (".bin", ".pt"):
            return False
        for d in _up(ckpt.parent):
            if (d / METADATA).is_file():
                meta = json.loads((d / METADATA).read_text())
                cfg = meta.get("model_config") if isinstance(meta, dict) else None
                return isinstance(cfg, dict) and "entity_vocab_size" in cfg
        return False
    except Exception:  # noqa: BLE001 - detection never fails, it just says no
        return False


class EntityVocab:
    """An entity vocabulary file, read as transformers' entity_vocab.json: key -> id (keys may share an id).

    ``entity_vocab.tsv``: ``title<TAB>count`` per line, id = line number, key = title (LUKE).
    ``entity_vocab.jsonl``: ``{"id", "entities": [[title, lang], ...]}`` per line, key ``lang:title``
    (bare when lang is null), the special entities bare (transformers' mLUKE conversion).

    The file is checked once when opened (ids 0..N-1, the special entities present) and streamed again
    in blocks by :meth:`blocks`: a multilingual vocabulary of millions of titles is never held whole.
    """

    BLOCK = 8192  # lines per block (one json.loads call for JSONL): fast, and memory stays small

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(self.path, "entity vocabulary not found")
        self.multilingual = self.path.suffix != ".tsv"
        self.specials: dict[str, int] = {}
        ids: list[torch.Tensor] = []
        for block, block_ids in self._blocks(with_ids=True):
            keys = dict(block)
            self.specials.update({t: keys[t] for t in (*SPECIAL_ENTITIES, "[MASK2]") if t in keys})
            ids.append(torch.tensor(block_ids, dtype=torch.long))
        every = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        if every.numel() == 0:
            raise ConfigError(self.path, "empty entity vocabulary")
        n = int(torch.unique(every).numel())
        if int(every.max()) != n - 1:
            raise ConfigError(self.path, f"entity ids are not 0..{n - 1} ({n} distinct ids, the largest "
                                         f"{int(every.max())})")
        self.size = n
        for special in SPECIAL_ENTITIES:
            if special not in self.specials:
                raise ConfigError(self.path, f"the entity vocabulary has no {special} entry")

    def blocks(self):
        """Lists of (key, id), in file order."""
        for block, _ in self._blocks(with_ids=False):
            yield block

    def items(self):
        for block in self.blocks():
            yield from block

    def _line_blocks(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                start, lines = 0, []
                for line in f:
                    lines.append(line)
                    if len(lines) == self.BLOCK:
                        yield start, lines
                        start, lines = start + len(lines), []
                if lines:
                    yield start, lines
        except UnicodeDecodeError as e:
            raise ConfigError(self.path, f"entity vocabulary is not UTF-8 text: {e}") from None

    def _blocks(self, with_ids: bool):
        """(pairs, ids of the lines) per block of lines."""
        for start, lines in self._line_blocks():
            if not self.multilingual:
                parts = [ln.rstrip("\r\n").split("\t") for ln in lines]
                bad = next((i for i, p in enumerate(parts) if len(p) != 2 or not p[1].strip().lstrip("-").isdigit()),
                           None)
                if bad is not None:
                    raise ConfigError(self.path, f"line {start + bad + 1}: expected 'title<TAB>count'")
                ids = range(start, start + len(lines))  # as LUKE's EntityVocab: the line number is the id
                yield list(zip([p[0] for p in parts], ids)), (list(ids) if with_ids else None)
                continue
            numbered = [(start + i, ln) for i, ln in enumerate(lines) if ln.strip()]
            try:
                items = json.loads("[" + ",".join(ln for _, ln in numbered) + "]")
            except json.JSONDecodeError:
                items = None
            pairs: list[tuple[str, int]] = []
            ids = []
            for i, (n, line) in enumerate(numbered):
                try:
                    item = items[i] if items is not None else json.loads(line)
                    eid, entities = item["id"], item["entities"]
                    if not isinstance(eid, int) or eid < 0:
                        raise ValueError(eid)
                    ids.append(eid)
                    for title, lang in entities:
                        if title in SPECIAL_ENTITIES:
                            pairs.append((title, eid))
                            break
                        pairs.append(((title if lang is None else f"{lang}:{title}"), eid))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ConfigError(self.path, f"line {n + 1}: expected {{\"id\": N >= 0, \"entities\": "
                                                 f"[[title, lang], ...]}} ({type(e).__name__})") from None
            yield pairs, ids


def read_entity_vocab(path: Path) -> EntityVocab:
    return EntityVocab(path)


class LukeFiles:
    """The checkpoint, metadata and entity vocabulary of one LUKE / mLUKE model, opened lazily."""

    def __init__(self, path: Path, metadata: Path | None = None, entity_vocab: Path | None = None):
        self.path = Path(path)
        self._tmp: TempDir | None = None
        root = self.path
        if is_tarball(self.path):
            self._tmp = TempDir("enc-luke-")
            extract_tar(self.path, self._tmp.path)
            found = sorted(self._tmp.path.rglob(PLAIN_NAME)) + sorted(self._tmp.path.rglob(DEEPSPEED_NAME))
            if not found:
                raise MissingFile(self.path, f"no {PLAIN_NAME} or {DEEPSPEED_NAME} inside the archive")
            root = found[0].parent
        if root.is_file():
            self.checkpoint = root
        elif root.is_dir():
            ck = _find_checkpoint(root)
            if ck is None:
                raise MissingFile(root, f"no {PLAIN_NAME}, {DEEPSPEED_NAME} or checkpoints/<tag>/{DEEPSPEED_NAME}")
            self.checkpoint = ck
        else:
            raise MissingFile(root, "no such file or directory")
        search = _up(self.checkpoint.parent)
        self.metadata_path = Path(metadata) if metadata else next((d / METADATA for d in search
                                                                  if (d / METADATA).is_file()), None)
        if self.metadata_path is None or not self.metadata_path.is_file():
            raise MissingFile(self.metadata_path or self.checkpoint.parent / METADATA,
                              "metadata.json (the model_config of the run) is missing beside the checkpoint")
        meta = read_json_object(self.metadata_path)
        cfg = meta.get("model_config")
        if not isinstance(cfg, dict):
            raise ConfigError(self.metadata_path, "no \"model_config\" object (not a LUKE metadata.json)")
        self.metadata, self.model_config = meta, cfg
        if entity_vocab:
            vocab_path = Path(entity_vocab)
        else:
            candidates = [d / n for d in [self.metadata_path.parent, *search] for n in (TSV_VOCAB, JSONL_VOCAB)]
            vocab_path = next((p for p in candidates if p.is_file()), self.metadata_path.parent / TSV_VOCAB)
            if not vocab_path.is_file():
                raise MissingFile(self.metadata_path.parent, f"no {TSV_VOCAB} or {JSONL_VOCAB} (the entity "
                                                             "vocabulary) beside metadata.json")
        self.entity_vocab = read_entity_vocab(vocab_path)
        self.dirs = [self.metadata_path.parent, *search]
        self._tensors: dict[str, StoredTensor] | None = None
        self._training: dict[str, StoredTensor] = {}
        self.deepspeed = False

    # ------------------------------------------------------------------ contents
    def tensors(self) -> dict[str, StoredTensor]:
        """The model's tensors by original key (DeepSpeed: those under "module")."""
        if self._tensors is None:
            src = ByteRange.whole_file(self.checkpoint)
            tree = load_lazy(src)
            if not isinstance(tree, dict):
                raise FormatError(self.checkpoint, f"expected a state dict, found a pickled {type(tree).__name__}")
            if isinstance(tree.get("module"), dict):
                self.deepspeed = True
                model = tree["module"]
                for k, v in tree.items():
                    if k != "module":
                        self._training.update({p: st for p, st in iter_tensors(v, str(k))})
            else:
                model = tree
            out: dict[str, StoredTensor] = {}
            for k, v in model.items():
                if not isinstance(v, StoredTensor):
                    raise FormatError(self.checkpoint, f"state dict entry {str(k)[:60]!r} is a {type(v).__name__}, "
                                                       "not a tensor")
                out[str(k)] = v
            if not out:
                raise FormatError(self.checkpoint, "the checkpoint holds no tensors")
            self._tensors = out
        return self._tensors

    def training_tensors(self) -> dict[str, StoredTensor]:
        """Tensors of a DeepSpeed checkpoint outside "module" (optimizer state ...): dropped, by name."""
        self.tensors()
        return self._training

    def find(self, *names: str) -> Path | None:
        for d in self.dirs:
            for n in names:
                if (d / n).is_file():
                    return d / n
        return None

    def files(self) -> list[Path]:
        if self._tmp is not None:
            return [self.path]
        return [self.checkpoint, self.metadata_path, self.entity_vocab.path]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None


# --------------------------------------------------------------------------- row-edited tensors


def read_with_rows(st: StoredTensor, label: str, extra: list[int]) -> torch.Tensor:
    """The tensor with copies of rows ``extra`` appended, read straight into the output buffer.

    A contiguous stored tensor is read into the first rows of one allocation, so appending a row to
    a 500K-row entity table costs one table of memory, not two. The storage CRC is still checked
    when the tensor spans its whole storage.
    """
    n = st.shape[0]
    out = torch.empty((n + len(extra), *st.shape[1:]), dtype=st.dtype)
    contiguous = list(st.stride) == [int(torch.tensor(st.shape[i + 1:]).prod()) for i in range(len(st.shape))]
    nbytes = st.span * st.dtype.itemsize
    start = st.offset * st.dtype.itemsize
    if not contiguous or nbytes == 0:
        out[:n] = st.read()
    else:
        s = st.storage
        if start + nbytes > s.nbytes:
            raise CorruptCheckpoint(s.file.label, f"tensor in storage {s.key} runs past its end")
        view = memoryview(out[:n].view(-1).view(torch.uint8).numpy())
        with s.file.open() as f:
            f.seek(s.offset + start)
            if f.readinto(view) != nbytes:
                raise CorruptCheckpoint(s.file.label, f"truncated checkpoint: storage {s.key} is cut short")
        if s.crc32 is not None and start == 0 and nbytes == s.nbytes and crc32(view) != s.crc32:
            raise CorruptCheckpoint(s.file.label, f"corrupted checkpoint: CRC mismatch in storage {s.key}")
    for i, r in enumerate(extra):
        out[n + i] = out[r]
    return out


def rows_appended(st: StoredTensor, name: str, extra: list[int], why: str) -> LazyTensor:
    return LazyTensor((st.shape[0] + len(extra), *st.shape[1:]), st.dtype,
                      lambda: read_with_rows(st, name, extra), (name,), why)
