"""Options shared by `enc convert`, `enc parity` and `enc inspect` (the same overrides must reach both sides)."""

from __future__ import annotations

from enum import Enum

import typer

from enc.cli.common import source_formats

Format = source_formats()

# Options shared with `enc parity` (the same overrides must be given to both).
FROM = typer.Option(None, "--from", help="Force the source format instead of detecting it.")
VOCAB = typer.Option(None, "--vocab", help="Tokenizer vocabulary file (Megatron: vocab.txt for BERT, vocab.json "
                                           "for GPT-2).")
MERGES = typer.Option(None, "--merges", help="GPT-2 merges.txt (Megatron GPT-2, with --vocab).")
TOKENIZER = typer.Option(None, "--tokenizer", help="Tokenizer file to use instead of the one found in SRC.")
CONFIG = typer.Option(None, "--config", help="The original config JSON, where SRC has none beside the checkpoint "
                                             "(MobileBERT).")
NUM_HEADS = typer.Option(None, "--num-heads", min=1, help="Attention heads, where the checkpoint does not say "
                                                          "(shapes cannot tell).")
NUM_KV_HEADS = typer.Option(None, "--num-kv-heads", min=1, help="Key/value heads (grouped-query attention), "
                                                                "overriding params.json.")
ROPE_THETA = typer.Option(None, "--rope-theta", min=0.0, help="Rotary base, overriding params.json rope_theta.")
SLIDING_WINDOW = typer.Option(None, "--sliding-window", min=0, help="Sliding attention window in tokens, "
                                                                    "overriding params.json (0: none).")
PART = typer.Option(None, "--part", help="encoder or decoder: write one half of an encoder-decoder alone "
                                         "(BertGeneration).")
HIDDEN_ACT = typer.Option(None, "--hidden-act", help="Activation where the source does not record it (BertGeneration: "
                                                     "gelu_new = TF's tanh GELU, gelu = erf).")
NO_ENTITY_EMBEDDINGS = typer.Option(False, "--no-entity-embeddings", help="LUKE/mLUKE: the lite variant, entity "
                                    "vocabulary [MASK] [UNK] [PAD] [MASK2] only (give it to parity too).")
SET = typer.Option([], "--set", metavar="KEY=VALUE", help="A converter option (repeatable); the keys each format "
                                                           "takes are listed at the end of `enc convert --help`.")


class Runtime(str, Enum):
    enc = "enc"
    transformers = "transformers"


RUNTIME = typer.Option(Runtime.enc, "--runtime", help="Run the converted model with enc's runtime or transformers' "
                                                      "classes (needs the hf extra).")
