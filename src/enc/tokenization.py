"""Tokenizers behind one small interface: sentencepiece (ALBERT, Mistral), tokenizer.json
(WordPiece / byte-level BPE through the ``tokenizers`` library).

``load_tokenizer(model_dir)`` picks the implementation from the files present.
Every tokenizer offers:

- ``encode(text, pair=None, add_special_tokens=True) -> Encoding`` (ids, token_type_ids, offsets)
- ``decode(ids, skip_special_tokens=True) -> str``, ``id_to_token(i)``, ``token_to_id(s)``
- ``vocab_size`` and the special ids it has (``mask_id``, ``pad_id``, ``cls_id``, ``sep_id``,
  ``bos_id``, ``eos_id``; None when absent) and ``mask_token``.

Offsets are (start, end) character spans in the ORIGINAL text, (0, 0) for special tokens.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enc.errors import ConfigError, MissingFile


@dataclass
class Encoding:
    ids: list[int]
    token_type_ids: list[int] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)
    # index of the sequence (0/1) each token came from; None for special tokens
    sequence_ids: list[int | None] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"invalid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def load_sentencepiece(model_file: str | Path, serialized: bytes | None = None):
    """A SentencePieceProcessor for ``model_file`` (or its ``serialized`` variant); one-line errors."""
    import sentencepiece as spm

    if not Path(model_file).is_file():
        raise MissingFile(model_file, "sentencepiece model not found")
    sp = spm.SentencePieceProcessor()
    try:
        if serialized is not None:
            sp.LoadFromSerializedProto(serialized)
        else:
            sp.Load(str(model_file))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
        raise ConfigError(model_file, f"not a valid sentencepiece model: {e}") from None
    return sp


class Tokenizer:
    vocab_size: int
    mask_token: str | None = None
    mask_id: int | None = None
    pad_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    chat_template: str | None = None

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.mask_id, self.pad_id, self.cls_id, self.sep_id, self.bos_id, self.eos_id)
                if i is not None}


# --------------------------------------------------------------------------- ALBERT sentencepiece


class AlbertSentencePiece(Tokenizer):
    """ALBERT's sentencepiece tokenization, as google-research/albert and HF AlbertTokenizer do it.

    Preprocessing: collapse whitespace (remove_space), ``\\`\\``/``''`` -> ``"``, strip accents
    (NFKD, drop combining marks) unless keep_accents, lower-case if do_lower_case. Pieces like
    ``9,`` are re-split so digits and the comma separate. ``[MASK]`` and the other control
    symbols written in the text are recognised as single tokens (whitespace before [MASK] is
    dropped, as HF's ``lstrip`` mask token does).
    """

    def __init__(self, model_file: Path, do_lower_case: bool = True, remove_space: bool = True,
                 keep_accents: bool = False):
        self.sp = load_sentencepiece(model_file)
        self.model_file = Path(model_file)
        self._sp_glued = None
        self.do_lower_case, self.remove_space, self.keep_accents = do_lower_case, remove_space, keep_accents
        self.vocab_size = self.sp.GetPieceSize()

        def pid(p: str) -> int | None:
            i = self.sp.PieceToId(p)
            return None if i == self.sp.unk_id() and p != self.sp.IdToPiece(i) else i

        self.mask_token = "[MASK]"
        self.mask_id, self.cls_id, self.sep_id = pid("[MASK]"), pid("[CLS]"), pid("[SEP]")
        self.pad_id, self.unk_id = pid("<pad>"), self.sp.unk_id()
        self.specials = {t: i for t, i in (("[MASK]", self.mask_id), ("[CLS]", self.cls_id),
                                            ("[SEP]", self.sep_id), ("<pad>", self.pad_id)) if i is not None}

    @property
    def sp_glued(self):
        """Text glued to a preceding special token ("[MASK].") continues a word: sentencepiece on
        the unsplit text adds no "\u2581" there, so such segments use a copy of the model with
        add_dummy_prefix off (this is also how masked pretraining data looked). Built on first use
        (protobuf costs a cold start more than the rest of the tokenizer)."""
        if self._sp_glued is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.model_file.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_glued = load_sentencepiece(self.model_file, proto.SerializeToString())
        return self._sp_glued

    @classmethod
    def from_dir(cls, d: Path) -> AlbertSentencePiece:
        cfg = _read_json(d / "tokenizer_config.json")
        return cls(d / "spiece.model", bool(cfg.get("do_lower_case", True)), bool(cfg.get("remove_space", True)),
                   bool(cfg.get("keep_accents", False)))

    # -- preprocessing with a char map back to the original text
    def _preprocess(self, text: str, base: int) -> tuple[str, list[int]]:
        out: list[str] = []
        src: list[int] = []
        i = 0
        n = len(text)
        if self.remove_space:
            while i < n and text[i].isspace():
                i += 1
            while n > i and text[n - 1].isspace():
                n -= 1
        while i < n:
            ch = text[i]
            if self.remove_space and ch.isspace():
                j = i
                while j < n and text[j].isspace():
                    j += 1
                out.append(" ")
                src.append(base + i)
                i = j
                continue
            if text.startswith("``", i) or text.startswith("''", i):
                out.append('"')
                src.append(base + i)
                i += 2
                continue
            piece = ch
            if not self.keep_accents:
                piece = "".join(c for c in unicodedata.normalize("NFKD", piece) if not unicodedata.combining(c))
            if self.do_lower_case:
                piece = piece.lower()
            for c in piece:
                out.append(c)
                src.append(base + i)
            i += 1
        return "".join(out), src

    def _pieces(self, text: str, base: int, glued: bool = False) -> list[tuple[int, int, int]]:
        """(id, start, end) for a text segment with no special tokens; offsets in the original text."""
        norm, src = self._preprocess(text, base)
        if not norm:
            return []
        proto = (self.sp_glued if glued else self.sp).EncodeAsProto(norm)  # begin/end are UTF-8 byte offsets into ``norm``
        b2c = [0] * (len(norm.encode()) + 1)
        pos = 0
        for ci, ch in enumerate(norm):
            n = len(ch.encode())
            for k in range(n):
                b2c[pos + k] = ci
            pos += n
        b2c[pos] = len(norm)
        out: list[tuple[int, int, int]] = []

        def span(b: int, e: int) -> tuple[int, int]:
            b, e = b2c[b], b2c[e]
            while b < e and norm[b] == " ":  # the piece's leading space is not part of the word
                b += 1
            if e <= b:
                at = src[min(b, len(src) - 1)]
                return (at, at)
            return (src[b], src[e - 1] + 1)

        for p in proto.pieces:
            piece = p.piece
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                sub = self.sp.EncodeAsPieces(piece[:-1].replace("\u2581", ""))
                if piece[0] != "\u2581" and sub and sub[0].startswith("\u2581"):
                    sub[0] = sub[0][1:] if len(sub[0]) > 1 else None
                    if sub[0] is None:
                        sub = sub[1:]
                sub.append(piece[-1])
                # offsets: spread over the original span, char by char
                b, e = span(p.begin, p.end)
                cursor = b
                for piece_str in sub:
                    length = len(piece_str.replace("\u2581", ""))
                    out.append((self.sp.PieceToId(piece_str), cursor, min(e, cursor + length)))
                    cursor += length
                continue
            out.append((p.id, *span(p.begin, p.end)))
        return out

    def _segment(self, text: str) -> list[tuple[int, int, int]]:
        """Split out special tokens written in the text, tokenize the rest."""
        out: list[tuple[int, int, int]] = []
        pos = 0
        while pos <= len(text):
            hits = [(text.find(tok, pos), tok) for tok in self.specials]
            hits = [(i, t) for i, t in hits if i >= 0]
            if not hits:
                rest = text[pos:]
                out.extend(self._pieces(rest, pos, glued=pos > 0 and rest[:1].strip() != ""))
                break
            i, tok = min(hits)
            left = text[pos:i]
            if tok == "[MASK]":
                left = left.rstrip()  # lstrip=True on the mask token
            out.extend(self._pieces(left, pos, glued=pos > 0 and left[:1].strip() != ""))
            out.append((self.specials[tok], i, i + len(tok)))
            pos = i + len(tok)
        return out

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        a = self._segment(text)
        b = self._segment(pair) if pair is not None else None
        enc = Encoding([], [], [], [])

        def add(tid: int, tt: int, off: tuple[int, int], seq: int | None) -> None:
            enc.ids.append(tid)
            enc.token_type_ids.append(tt)
            enc.offsets.append(off)
            enc.sequence_ids.append(seq)

        if add_special_tokens and self.cls_id is not None:
            add(self.cls_id, 0, (0, 0), None)
        for tid, s, e in a:
            add(tid, 0, (s, e), 0)
        if add_special_tokens and self.sep_id is not None:
            add(self.sep_id, 0, (0, 0), None)
        if b is not None:
            for tid, s, e in b:
                add(tid, 1, (s, e), 1)
            if add_special_tokens and self.sep_id is not None:
                add(self.sep_id, 1, (0, 0), None)
        return enc

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.DecodeIds([i for i in ids if i not in self.special_ids])
        # As transformers (Metaspace decoder): special tokens as written, a run of pieces keeps its leading
        # space except at the very start: "[CLS] plants create energy through[MASK].[SEP]".
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self.sp.DecodeIds(run)
                out.append(" " + text if out and self.sp.IdToPiece(run[0]).startswith("\u2581") else text)
                run.clear()

        for i in ids:
            if i in self.special_ids:
                flush()
                out.append(self.sp.IdToPiece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i


# --------------------------------------------------------------------------- Llama/Mistral sentencepiece


class LlamaSentencePiece(Tokenizer):
    """Mistral / Mixtral (Llama-family) sentencepiece BPE, exactly as ``sentencepiece`` tokenizes.

    ``encode(text)`` is ``[bos] + sp.encode(text)``: sentencepiece's own dummy-prefix rule, so the
    first word gets its "▁" (the piece some converted HF tokenizers drop). Text is never scanned
    for special tokens; :meth:`encode_with_specials` does that for rendered chat templates, with
    each text run between special/control tokens encoded on its own (mistral-common's rule).
    """

    def __init__(self, model_file: Path, add_bos: bool = True, add_eos: bool = False,
                 chat_template: str | None = None):
        self.sp = load_sentencepiece(model_file)
        self.model_file = Path(model_file)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.bos_token = self.sp.IdToPiece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.sp.IdToPiece(self.eos_id) if self.eos_id is not None else None
        # control pieces (<s>, </s>, [INST] ...) by their text, longest first for matching
        self.controls = {self.sp.IdToPiece(i): i for i in range(self.vocab_size) if self.sp.IsControl(i)}
        self._control_order = sorted(self.controls, key=len, reverse=True)

    @classmethod
    def from_dir(cls, d: Path) -> LlamaSentencePiece:
        d = Path(d)
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(jinja_file, f"chat template is not UTF-8 text: {e}") from None
        return cls(d / "tokenizer.model", bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False)),
                   template)

    @property
    def special_ids(self) -> set[int]:
        return set(self.controls.values()) | {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def _pieces(self, text: str, base: int) -> list[tuple[int, int, int]]:
        """(id, char start, char end) of sentencepiece's tokenization of ``text``, offsets shifted by ``base``.

        Offsets are recovered by walking the pieces over the text ("▁" is a space; the dummy
        prefix covers no character; byte-fallback pieces share the character they spell).
        """
        if not text:
            return []
        ids = self.sp.encode(text)
        out: list[tuple[int, int, int]] = []
        pos, pending = 0, not text.startswith(" ")
        buf = b""
        for tid in ids:
            if self.sp.IsByte(tid):
                buf += bytes([int(self.sp.IdToPiece(tid)[3:5], 16)])
                start = pos
                try:
                    buf.decode("utf-8")
                    pos, buf = pos + 1, b""
                except UnicodeDecodeError:
                    pass
                out.append((tid, base + start, base + min(pos if not buf else pos + 1, len(text))))
                continue
            piece = "?" if tid == self.unk_id else self.sp.IdToPiece(tid).replace("\u2581", " ")
            if pending and piece.startswith(" "):
                piece = piece[1:]
            pending = False
            start, pos = pos, min(pos + len(piece), len(text))
            out.append((tid, base + start, base + pos))
        return out

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        enc = Encoding([], [], [], [])

        def special(i: int | None, tt: int) -> None:
            if add_special_tokens and i is not None:
                enc.ids.append(i)
                enc.token_type_ids.append(tt)
                enc.offsets.append((0, 0))
                enc.sequence_ids.append(None)

        for seq, t in enumerate([text] if pair is None else [text, pair]):
            if self.add_bos:
                special(self.bos_id, seq)
            for tid, s, e in self._pieces(t, 0):
                enc.ids.append(tid)
                enc.token_type_ids.append(seq)
                enc.offsets.append((s, e))
                enc.sequence_ids.append(seq)
            if self.add_eos:
                special(self.eos_id, seq)
        return enc

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a rendered chat template: control-token strings become their ids (no BOS added)."""
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            hits = [(text.find(tok, pos), -len(tok), tok) for tok in self._control_order]
            hits = [h for h in hits if h[0] >= 0]
            if not hits:
                ids.extend(self.sp.encode(text[pos:]))
                break
            i, _, tok = min(hits)
            if i > pos:
                ids.extend(self.sp.encode(text[pos:i]))
            ids.append(self.controls[tok])
            pos = i + len(tok)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i


# --------------------------------------------------------------------------- tokenizer.json (tokenizers library)


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` run by the ``tokenizers`` library: BERT WordPiece or GPT-2 byte-level BPE.

    Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present, else
    from the usual names found in the vocabulary ([CLS] [SEP] [MASK] [PAD] [UNK], <|endoftext|>).
    Offsets are the library's (character spans of the original text, (0, 0) for added specials).
    :meth:`bert_wordpiece` and :meth:`gpt2_bpe` build the ``tokenizer.json`` transformers' fast
    tokenizers use for BertTokenizer / GPT2Tokenizer from the original vocabulary files.
    """

    def __init__(self, tokenizer_file: Path, config: dict | None = None):
        from tokenizers import Tokenizer as _Tok

        if not Path(tokenizer_file).is_file():
            raise MissingFile(tokenizer_file, "tokenizer.json not found")
        try:
            self.tk = _Tok.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises its own Exception type on bad JSON / models
            raise ConfigError(tokenizer_file, f"not a valid tokenizer.json: {e}") from None
        cfg = config or {}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.is_byte_level = type(self.tk.model).__name__ == "BPE"
        self.add_bos = False

        def special(key: str, *fallbacks: str) -> tuple[str | None, int | None]:
            names = [_token_str(cfg.get(key))] + list(fallbacks)
            for n in names:
                if n is not None and self.tk.token_to_id(n) is not None:
                    return n, self.tk.token_to_id(n)
            return None, None

        self.mask_token, self.mask_id = special("mask_token", "[MASK]", "<mask>")
        self.cls_token, self.cls_id = special("cls_token", "[CLS]")
        self.sep_token, self.sep_id = special("sep_token", "[SEP]")
        self.pad_token, self.pad_id = special("pad_token", "[PAD]")
        self.unk_token, self.unk_id = special("unk_token", "[UNK]")
        self.bos_token, self.bos_id = special("bos_token", "<|endoftext|>")
        self.eos_token, self.eos_id = special("eos_token", "<|endoftext|>")
        added = [t.content for t in self.tk.get_added_tokens_decoder().values() if t.special]
        self._specials = {self.tk.token_to_id(t) for t in added} | super().special_ids
        self._specials.discard(None)

    @classmethod
    def from_dir(cls, d: Path) -> HFTokenizer:
        d = Path(d)
        cfg = {**_read_json(d / "special_tokens_map.json"), **_read_json(d / "tokenizer_config.json")}
        return cls(d / "tokenizer.json", cfg)

    @property
    def special_ids(self) -> set[int]:
        return set(self._specials)

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        e = self.tk.encode(text, pair, add_special_tokens=add_special_tokens)
        return Encoding(list(e.ids), list(e.type_ids), [tuple(o) for o in e.offsets], list(e.sequence_ids))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def decode_stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder: ``step(id)`` returns the text the new token completes ("" if none yet)."""
        return StreamDecoder(self, (), skip_special_tokens)

    # -- building tokenizer.json from original vocabulary files
    @staticmethod
    def bert_wordpiece(vocab_file: Path, lowercase: bool):
        """BERT WordPiece as transformers' BertTokenizerFast builds it (BertNormalizer, [CLS] A [SEP] B [SEP])."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

        vocab = read_wordpiece_vocab(vocab_file)
        for tok in ("[UNK]", "[CLS]", "[SEP]"):
            if tok not in vocab:
                raise ConfigError(vocab_file, f"WordPiece vocabulary has no {tok} token")
        tk = _Tok(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                   max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                   lowercase=lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tk.decoder = decoders.WordPiece(prefix="##")
        _add_specials(tk, [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
        return tk

    @staticmethod
    def gpt2_bpe(vocab_file: Path, merges_file: Path):
        """GPT-2 byte-level BPE as transformers' GPT2TokenizerFast builds it (no BOS/EOS added)."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, processors

        vocab = read_bpe_vocab(vocab_file)
        merges = read_bpe_merges(merges_file)
        tk = _Tok(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        if "<|endoftext|>" in vocab:
            _add_specials(tk, ["<|endoftext|>"])
        return tk


class StreamDecoder:
    """Incremental detokenization over a short window (the approach of HF TGI / vLLM).

    Decodes the ids since the last emitted boundary with a little left context (the prompt's last
    tokens at first) and emits the new suffix once it no longer ends in a replacement character, so
    "é" split over two byte-level tokens, WordPiece "##" continuations and sentencepiece's leading
    spaces come out right.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 window: int = 6):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = [int(i) for i in prompt_ids]
        self.prefix = max(0, len(self.ids) - window)  # ids before this are not decoded again
        self.read = len(self.ids)  # text of ids[prefix:read] was already emitted (or is the prompt's)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    step = push

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        complete = after.startswith(before) and len(after) > len(before) and not after.endswith("\ufffd")
        if not complete and not final:
            return ""  # an incomplete character, or a token with no text yet: wait for the next one
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


def _add_specials(tk, tokens: list[str]) -> None:
    from tokenizers import AddedToken

    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


def read_wordpiece_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number (BERT's load_vocab)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "vocabulary file not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"vocabulary is not UTF-8 text: {e}") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        vocab[line.rstrip("\r")] = i  # a repeated token keeps its last id, as BERT's load_vocab does
    if not vocab:
        raise ConfigError(path, "empty vocabulary")
    return vocab


def read_bpe_vocab(path: Path) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "vocabulary file not found")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"GPT-2 vocab.json is not valid JSON: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ConfigError(path, "GPT-2 vocab.json must map tokens to integer ids")
    return vocab


def read_bpe_merges(path: Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "merges file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"merges file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    merges = []
    for n, line in enumerate(text.split("\n")):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConfigError(path, f"line {n + 1}: a merge is two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ConfigError(path, "merges file holds no merges (a GPT-2 merges.txt has tens of thousands; an empty "
                                "one would make a character-level tokenizer)")
    return merges


# --------------------------------------------------------------------------- dispatch

# (file that identifies the tokenizer, "module:Class" with a from_dir(dir) classmethod), first match wins
LOADERS: list[tuple[str, str]] = [
    ("entity_vocab.json", "enc.tokenization_luke:LukeTokenizer"),  # LUKE / mLUKE (words + entities)
    ("spiece.model", "enc.tokenization:AlbertSentencePiece"),  # ALBERT
    ("tokenizer.model", "enc.tokenization:LlamaSentencePiece"),  # Mistral / Mixtral
    ("tokenizer.json", "enc.tokenization:HFTokenizer"),  # WordPiece (BERT) / byte-level BPE (GPT-2)
]


def register_loader(filename: str, target: str, first: bool = False) -> None:
    entry = (filename, target)
    if entry not in LOADERS:
        LOADERS.insert(0, entry) if first else LOADERS.append(entry)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    import importlib

    d = Path(model_dir)
    for fname, target in LOADERS:
        if (d / fname).is_file():
            mod, cls = target.split(":")
            return getattr(importlib.import_module(mod), cls).from_dir(d)
    raise MissingFile(d, "no tokenizer files found (expected one of: " + ", ".join(f for f, _ in LOADERS) + ")")
