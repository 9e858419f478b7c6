"""LUKE / mLUKE tokenizers: words (RoBERTa byte-level BPE or XLM-R sentencepiece) plus entity spans.

Word tokenization is the one the model was trained with:

- LUKE: RoBERTa's byte-level BPE (``vocab.json`` + ``merges.txt``), run by the ``tokenizers`` library
  with RoBERTa's added tokens (``<mask>`` strips the space before it) and LUKE's ``<ent>``/``<ent2>``.
- mLUKE: XLM-R's ``sentencepiece.bpe.model`` with fairseq's id layout (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3, piece ``i`` -> ``i + 1``, ``<mask>`` last), special tokens written in the
  text split out first (``<mask>`` strips the space before it), each remaining chunk encoded by
  sentencepiece, as transformers' MLukeTokenizer does.

Entities follow transformers' LukeTokenizer / MLukeTokenizer (``_create_input_sequence``,
``prepare_for_model``): the text is cut at every span boundary (a boundary after a space moves before
it), each piece is tokenized on its own, an entity's token span is where its boundaries fell; entity
position ids are the span's token positions (after ``<s>``), -1 padded to the longest mention (at most
``max_mention_length``); an entity with no title is ``[MASK]``, an unknown title ``[UNK]``.
"""

from __future__ import annotations

import json
from pathlib import Path

from enc.errors import ConfigError, MissingFile, UsageError
from enc.tokenization import Encoding, Tokenizer, load_sentencepiece, read_bpe_merges, read_bpe_vocab

ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ENT_TOKENS = ("<ent>", "<ent2>")


class _RobertaWords:
    """RoBERTa byte-level BPE, ids exactly as vocab.json, <ent>/<ent2> after the vocabulary."""

    def __init__(self, vocab_file: Path, merges_file: Path):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tok

        self.vocab = read_bpe_vocab(vocab_file)
        for t in (*ROBERTA_SPECIALS, "<mask>"):
            if t not in self.vocab:
                raise ConfigError(vocab_file, f"not a RoBERTa vocabulary: no {t} token")
        tk = _Tok(models.BPE(self.vocab, read_bpe_merges(merges_file), dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROBERTA_SPECIALS]
                              + [AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
        self.size = len(self.vocab)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ENT_TOKENS])
        self.tk = tk

    def ids(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids) if text else []

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class _XLMRWords:
    """XLM-R sentencepiece with fairseq's ids; special tokens in the text split out first."""

    def __init__(self, model_file: Path):
        self.sp = load_sentencepiece(model_file)
        n = self.sp.GetPieceSize()
        self.size = n + 2  # <s> <pad> </s> <unk> + pieces 3.. shifted by one + <mask>
        self.specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": n + 1,
                         ENT_TOKENS[0]: n + 2, ENT_TOKENS[1]: n + 3}
        self.by_id = {v: k for k, v in self.specials.items()}
        self._order = sorted(self.specials, key=len, reverse=True)

    def _chunk(self, text: str) -> list[int]:
        return [3 if i == 0 else i + 1 for i in self.sp.encode(text)] if text else []

    def ids(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        while pos < len(text):
            hits = [(i, -len(t), t) for t in self._order if (i := text.find(t, pos)) >= 0]
            if not hits:
                out += self._chunk(text[pos:])
                break
            i, _, tok = min(hits)
            left = text[pos:i]
            out += self._chunk(left.rstrip() if tok == "<mask>" else left)
            out.append(self.specials[tok])
            pos = i + len(tok)
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i + 1

    def id_to_token(self, i: int) -> str:
        i = int(i)
        return self.by_id[i] if i in self.by_id else self.sp.IdToPiece(i - 1)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if i in self.by_id:
                if not skip_special_tokens:
                    pieces.append(self.by_id[i])
                continue
            pieces.append(self.sp.IdToPiece(i - 1))
        return "".join(pieces).replace("\u2581", " ").strip()


def word_tokenizer(vocab: Path | None = None, merges: Path | None = None, spm: Path | None = None):
    if spm is not None:
        return _XLMRWords(spm)
    if vocab is None or merges is None:
        raise UsageError(None, "a RoBERTa BPE tokenizer needs both vocab.json and merges.txt")
    return _RobertaWords(vocab, merges)


class LukeTokenizer(Tokenizer):
    """enc's tokenizer interface for a converted LUKE / mLUKE directory, plus :meth:`encode_entities`."""

    def __init__(self, words, entity_vocab: dict[str, int], max_mention_length: int = 30):
        self.words = words
        self.entity_vocab = entity_vocab
        self.max_mention_length = max_mention_length
        self.vocab_size = words.size + 2
        self.mask_token = "<mask>"
        self.mask_id = words.token_to_id("<mask>")
        self.cls_id = self.bos_id = words.token_to_id("<s>")
        self.sep_id = self.eos_id = words.token_to_id("</s>")
        self.pad_id = words.token_to_id("<pad>")
        self.unk_id = words.token_to_id("<unk>")
        for t in ("[MASK]", "[UNK]", "[PAD]"):
            if t not in entity_vocab:
                raise ConfigError(None, f"entity_vocab.json has no {t} entry")
        self.entity_mask_id, self.entity_unk_id = entity_vocab["[MASK]"], entity_vocab["[UNK]"]
        self.entity_pad_id = entity_vocab["[PAD]"]
        titles: dict[int, list[str]] = {}
        for k, v in entity_vocab.items():
            titles.setdefault(int(v), []).append(k)
        self.entity_titles = titles

    @classmethod
    def from_dir(cls, d: Path) -> LukeTokenizer:
        d = Path(d)
        path = d / "entity_vocab.json"
        try:
            ev = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(path, f"invalid entity vocabulary: {e}") from None
        if not isinstance(ev, dict) or not all(isinstance(v, int) for v in ev.values()):
            raise ConfigError(path, "entity_vocab.json must map titles to integer ids")
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((d / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(d / "tokenizer_config.json", f"invalid JSON: {e}") from None
        if (d / "sentencepiece.bpe.model").is_file():
            words = _XLMRWords(d / "sentencepiece.bpe.model")
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            words = _RobertaWords(d / "vocab.json", d / "merges.txt")
        else:
            raise MissingFile(d, "entity_vocab.json without word tokenizer files (vocab.json + merges.txt, or "
                                 "sentencepiece.bpe.model)")
        return cls(words, ev, int(cfg.get("max_mention_length", 30)))

    # ------------------------------------------------------------------ words
    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        ids = self.words.ids(text)
        if pair is not None:
            ids = ids + [self.sep_id, self.sep_id] + self.words.ids(pair) if add_special_tokens else ids + \
                self.words.ids(pair)
        if add_special_tokens:
            ids = [self.cls_id] + ids + [self.sep_id]
        return Encoding(ids, [0] * len(ids))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.words.decode(list(ids), skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.words.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.words.token_to_id(token)

    # ------------------------------------------------------------------ entities
    def encode_entities(self, text: str, spans: list[tuple[int, int]], entities: list[str] | None = None) -> dict:
        """input_ids, entity_ids, entity_position_ids ([N, M], -1 padded) for ``text`` with character ``spans``."""
        for s, e in spans:
            if not (0 <= s < e <= len(text)):
                raise UsageError(None, f"entity span {s}:{e} is not inside the {len(text)}-character text")
        if entities is not None and len(entities) != len(spans):
            raise UsageError(None, f"{len(entities)} entity title(s) for {len(spans)} span(s)")
        ids: list[int] = []
        where: dict[int, int] = {}
        cur = 0
        for pos in sorted({p for span in spans for p in span}):
            cut = pos - 1 if pos > 0 and text[pos - 1] == " " else pos  # the space belongs to the next token
            if cut != cur:
                ids += self.words.ids(text[cur:cut])
                cur = cut
            where[pos] = len(ids)
        ids += self.words.ids(text[cur:])
        token_spans = [(where[s] + 1, where[e] + 1) for s, e in spans]  # + 1: after <s>
        M = max([min(e - s, self.max_mention_length) for s, e in token_spans] + [1])
        positions = [(list(range(s, e))[: self.max_mention_length] + [-1] * M)[:M] for s, e in token_spans]
        if entities is None:
            entity_ids = [self.entity_mask_id] * len(spans)
        else:
            entity_ids = [self.entity_vocab.get(t, self.entity_unk_id) for t in entities]
        return {"input_ids": [self.cls_id] + ids + [self.sep_id], "entity_ids": entity_ids,
                "entity_position_ids": positions, "token_spans": token_spans}
