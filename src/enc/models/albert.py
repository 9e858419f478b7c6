"""ALBERT in the Hugging Face layout: factorized embeddings, shared layer groups, SDPA attention.

Parameter names equal transformers' ``AlbertForPreTraining`` state dict, so any HF ALBERT
directory (enc's output or one saved by transformers) loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enc.models.albert_config import AlbertConfig
from enc.models.common import activation, build, padding_mask


class AlbertEmbeddings(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.embedding_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.embedding_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.embedding_size)
        self.LayerNorm = nn.LayerNorm(c.embedding_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class AlbertAttention(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, H // self.n_heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask)
        ctx = ctx.transpose(1, 2).reshape(B, T, H)
        return self.LayerNorm(x + self.dense(ctx))


class AlbertLayer(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.attention = AlbertAttention(c)
        self.ffn = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ffn_output = nn.Linear(c.intermediate_size, c.hidden_size)
        self.full_layer_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.full_layer_layer_norm(a + self.ffn_output(self.act(self.ffn(a))))


class AlbertLayerGroup(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(c) for _ in range(c.inner_group_num))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, hidden_states: list | None = None) -> torch.Tensor:
        for layer in self.albert_layers:
            x = layer(x, mask)
            if hidden_states is not None:  # one state per inner layer, as transformers reports them
                hidden_states.append(x)
        return x


class AlbertTransformer(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.c = c
        self.embedding_hidden_mapping_in = nn.Linear(c.embedding_size, c.hidden_size)
        self.albert_layer_groups = nn.ModuleList(AlbertLayerGroup(c) for _ in range(c.num_hidden_groups))

    def group_of(self, layer: int) -> int:
        """Layer l uses group int(l / (L / G)), as both TF and HF ALBERT do."""
        return int(layer / (self.c.num_hidden_layers / self.c.num_hidden_groups))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, hidden_states: list | None = None) -> torch.Tensor:
        x = self.embedding_hidden_mapping_in(x)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in range(self.c.num_hidden_layers):
            x = self.albert_layer_groups[self.group_of(layer)](x, mask, hidden_states)
        return x


class AlbertModel(nn.Module):
    prefix = "albert."

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False) -> dict:
        x = self.embeddings(input_ids, token_type_ids)
        mask = padding_mask(attention_mask, x.dtype)
        hs: list | None = [] if output_hidden_states else None
        x = self.encoder(x, mask, hs)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return {"last_hidden_state": x, "pooler_output": pooled, "hidden_states": hs}


class AlbertMLMHead(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.embedding_size)
        self.LayerNorm = nn.LayerNorm(c.embedding_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.embedding_size, c.vocab_size)
        self.bias = self.decoder.bias  # HF ties predictions.bias and predictions.decoder.bias
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(x))))


class AlbertSOPHead(nn.Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.classifier = nn.Linear(c.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class AlbertForMaskedLM(nn.Module):
    TIED = {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
            "predictions.decoder.bias": "predictions.bias"}

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config)
        self.predictions = AlbertMLMHead(config)
        self.predictions.decoder.weight = self.albert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False) -> dict:
        out = self.albert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        out["logits"] = self.predictions(out["last_hidden_state"])
        return out


class AlbertForPreTraining(AlbertForMaskedLM):
    def __init__(self, config: AlbertConfig):
        super().__init__(config)
        self.sop_classifier = AlbertSOPHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False) -> dict:
        out = super().forward(input_ids, attention_mask, token_type_ids, output_hidden_states)
        out["sop_logits"] = self.sop_classifier(out["pooler_output"])
        return out


HEADS = {"pretraining": AlbertForPreTraining, "mlm": AlbertForMaskedLM, "base": AlbertModel}


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    from enc.models.loading import load_into, strip_prefix

    wanted = set(module.state_dict())
    sd = strip_prefix(sd, "albert.", wanted)
    base = module if isinstance(module, AlbertModel) else module.albert
    pooler = "pooler." if isinstance(module, AlbertModel) else "albert.pooler."
    if not any(k.startswith(pooler) for k in sd) and not isinstance(module, AlbertForPreTraining):
        base.pooler = None  # transformers' AlbertForMaskedLM has no pooler; nothing here needs one
        wanted = set(module.state_dict())
    if isinstance(module, AlbertModel):
        load_into(module, sd, path, ignore_unexpected=("predictions.", "sop_classifier.", "classifier.", "qa_outputs."))
        return
    if "predictions.bias" not in sd and "predictions.decoder.bias" in sd:
        sd["predictions.bias"] = sd["predictions.decoder.bias"]
    sd.pop("predictions.decoder.bias", None)
    load_into(module, sd, path, tied=AlbertForMaskedLM.TIED,
              ignore_unexpected=("sop_classifier.",) if not isinstance(module, AlbertForPreTraining) else ())


def from_pretrained(model_dir, dtype: torch.dtype | None = None, device: str = "cpu", head: str | None = None):
    """Load an HF ALBERT directory. ``head``: pretraining | mlm | base (default: what the weights hold)."""
    from enc.models.loading import load_state_dict, read_config

    cfg = AlbertConfig.from_dict(read_config(model_dir))
    sd = load_state_dict(model_dir)
    if head is None:
        keys = set(sd)
        head = ("pretraining" if any(k.startswith("sop_classifier.") for k in keys)
                else "mlm" if any(k.startswith("predictions.") for k in keys) else "base")
    model = build(HEADS[head], cfg)
    load_weights(model, sd, Path(model_dir))
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)
