"""Make examples/mobilebert_tiny: a tiny MobileBERT original release, trained with real TensorFlow.

Needs TensorFlow (never installed in the project venv); CI does not run it. From the repository root:

    python3 -m venv /work/venvs/tf && /work/venvs/tf/bin/pip install tensorflow-cpu
    /work/venvs/tf/bin/python examples/mobilebert_tiny/make_example.py

What it does, the way google-research/mobilebert does it:
  1. writes a BERT-style uncased WordPiece `vocab.txt` ([PAD] 0, [UNK] 100-style specials first,
     then punctuation and every word of the small corpus below, plus a few `##` pieces);
  2. builds MobileBERT's graph with tf.compat.v1 variables under the original names
     (bert/embeddings/embedding_transformation, bert/embeddings/FakeLayerNorm,
     bert/encoder/layer_N/bottleneck/{input,attention}, attention/self/{query,key,value},
     ffn_layer_J, output/bottleneck, cls/predictions/extra_output_weights, cls/seq_relationship):
     trigram input, bottlenecks with a shared key/query bottleneck, 4 stacked FFNs, "no_norm"
     (x * gamma + beta), relu, a real LayerNorm (eps 1e-12) in the MLM transform, no pooler
     (classifier_activation false), and the original's "-6" attention mask;
  3. trains it with masked-LM + next-sentence prediction and BERT's AdamWeightDecay optimizer
     (slots `<var>/adam_m`, `<var>/adam_v`);
  4. saves every global variable (weights, Adam slots, global_step) with tf.compat.v1.train.Saver
     as `mobilebert.ckpt` (the release's prefix; no .meta), writes the config JSON under the name
     the google-research repo uses for its configs;
  5. stores TF's own outputs for a few sentences (each run unpadded, as a batch of one) in
     tests/fixtures/tf/mobilebert_tiny_tf_outputs.npz: the ids TF saw, every layer's hidden state,
     the MLM logits at every position and the NSP logits.

Deterministic up to TF's CPU thread scheduling. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG_NAME = "mobilebert_tiny_config.json"

CONFIG = {
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 48,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "max_position_embeddings": 32,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "type_vocab_size": 2,
    "vocab_size": 0,  # set from the vocabulary
    "embedding_size": 24,
    "trigram_input": True,
    "use_bottleneck": True,
    "intra_bottleneck_size": 24,
    "use_bottleneck_attention": False,
    "key_query_shared_bottleneck": True,
    "num_feedforward_networks": 4,
    "normalization_type": "no_norm",
    "classifier_activation": False,
}
SEQ_LEN, MAX_PRED, BATCH = 24, 4, 32
STEPS = int(os.environ.get("MOBILEBERT_TINY_STEPS", 5000))
LR, WARMUP, SEED = float(os.environ.get("MOBILEBERT_TINY_LR", 1e-3)), 200, 4321

CAPITALS = [("paris", "france"), ("berlin", "germany"), ("rome", "italy"), ("madrid", "spain"),
            ("tokyo", "japan"), ("cairo", "egypt"), ("lisbon", "portugal"), ("athens", "greece")]  # fmt: skip
FOODS = [("cows", "grass"), ("rabbits", "carrots"), ("monkeys", "bananas"), ("pandas", "bamboo"),
         ("cats", "fish"), ("bears", "honey")]  # fmt: skip
COLORS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]


def paragraphs() -> list[list[str]]:
    return [
        [f"the capital of {k} is {c}." for c, k in CAPITALS],
        [f"{c} is the capital of {k}." for c, k in CAPITALS],
        [f"{a} like to eat {f}." for a, f in FOODS],
        [f"{x} is {c}." for x, c in COLORS],
        ["the sun rises in the east.", "the sun sets in the west.", "the moon shines at night.",
         "birds fly in the sky.", "fish swim in the sea.", "dogs bark at cats."],
    ]


# --------------------------------------------------------------------------------------- vocabulary

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer for plain lower-case ASCII text: split on spaces and punctuation."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_vocab(sentences: list[str]) -> list[str]:
    words = sorted({t for s in sentences for t in basic_tokens(s)} | {"the", "a", "is", "of"})
    punct = [w for w in words if not w.isalnum()]
    words = [w for w in words if w.isalnum()]
    # A few continuation pieces, so "capitals" or "eating" tokenize into word + ## piece.
    return SPECIALS + punct + words + ["##s", "##ing", "##ed"]


def encode(vocab: dict[str, int], text: str) -> list[int]:
    """WordPiece on whole words (every corpus word is in the vocabulary); "[MASK]" is kept."""
    out = []
    for piece in re.findall(r"\[MASK\]|\w+|[^\w\s]", text):
        out.append(vocab[piece] if piece == "[MASK]" else vocab.get(piece.lower(), vocab["[UNK]"]))
    return out


# ------------------------------------------------------------------------------------------ model


def init(stddev: float = 0.02):
    return tf1.truncated_normal_initializer(stddev=stddev)


def dense(x, units: int, name: str, act=None):
    """modeling.dense_layer_2d: kernel [in, out], bias [out]."""
    with tf1.variable_scope(name):
        w = tf1.get_variable("kernel", [x.shape[-1], units], initializer=init())
        b = tf1.get_variable("bias", [units], initializer=tf1.zeros_initializer())
    y = tf.tensordot(x, w, [[x.shape.ndims - 1], [0]]) + b
    return act(y) if act is not None else y


def no_norm(x, name: str = "FakeLayerNorm"):
    """modeling.layer_norm(..., "no_norm"): x * gamma + beta under scope FakeLayerNorm."""
    with tf1.variable_scope(name):
        beta = tf1.get_variable("beta", [x.shape[-1]], initializer=tf1.zeros_initializer())
        gamma = tf1.get_variable("gamma", [x.shape[-1]], initializer=tf1.ones_initializer())
    return x * gamma + beta


def layer_norm(x, name: str = "LayerNorm"):
    """tf.contrib.layers.layer_norm over the last axis (variance epsilon 1e-12)."""
    with tf1.variable_scope(name):
        beta = tf1.get_variable("beta", [x.shape[-1]], initializer=tf1.zeros_initializer())
        gamma = tf1.get_variable("gamma", [x.shape[-1]], initializer=tf1.ones_initializer())
    mean, var = tf.nn.moments(x, [-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-12) * gamma + beta


def attention(q_in, k_in, v_in, mask, n_heads: int, size: int):
    """modeling.attention_layer with the quantization-friendly -6 mask."""
    head = size // n_heads

    def heads(x, name):
        y = dense(x, size, name)
        return tf.reshape(y, [tf.shape(y)[0], tf.shape(y)[1], n_heads, head])

    q, k, v = heads(q_in, "query"), heads(k_in, "key"), heads(v_in, "value")
    scores = tf.einsum("BFNH,BTNH->BNFT", q, k) * (1.0 / np.sqrt(head))
    m = tf.cast(mask, tf.float32)[:, None, None, :]
    scores = scores * m + (1.0 - m) * -6.0
    ctx = tf.einsum("BNFT,BTNH->BFNH", tf.nn.softmax(scores), v)
    return tf.reshape(ctx, [tf.shape(ctx)[0], tf.shape(ctx)[1], size])


def mobilebert(ids, types, mask):
    c = CONFIG
    H, B, E = c["hidden_size"], c["intra_bottleneck_size"], c["embedding_size"]
    with tf1.variable_scope("bert"):
        with tf1.variable_scope("embeddings"):
            table = tf1.get_variable("word_embeddings", [c["vocab_size"], E], initializer=init())
            x = tf.gather(table, ids)
            x = tf.concat([tf.pad(x[:, 1:], [[0, 0], [0, 1], [0, 0]]), x,
                           tf.pad(x[:, :-1], [[0, 0], [1, 0], [0, 0]])], axis=2)
            x = dense(x, H, "embedding_transformation")
            tt = tf1.get_variable("token_type_embeddings", [c["type_vocab_size"], H], initializer=init())
            pos = tf1.get_variable("position_embeddings", [c["max_position_embeddings"], H], initializer=init())
            x = x + tf.gather(tt, types) + pos[None, : tf.shape(ids)[1]]
            x = no_norm(x)
        layers = [x]
        with tf1.variable_scope("encoder"):
            prev = x
            for i in range(c["num_hidden_layers"]):
                with tf1.variable_scope(f"layer_{i}"):
                    with tf1.variable_scope("bottleneck"):
                        with tf1.variable_scope("input"):
                            layer_input = no_norm(dense(prev, B, "dense"))
                        with tf1.variable_scope("attention"):
                            shared = no_norm(dense(prev, B, "dense"))
                    with tf1.variable_scope("attention"):
                        with tf1.variable_scope("self"):
                            ctx = attention(shared, shared, prev, mask, c["num_attention_heads"], B)
                        with tf1.variable_scope("output"):
                            h = no_norm(dense(ctx, B, "dense") + layer_input)
                    for j in range(c["num_feedforward_networks"] - 1):
                        with tf1.variable_scope(f"ffn_layer_{j}"):
                            inter = dense(h, c["intermediate_size"], "intermediate/dense", tf.nn.relu)
                            with tf1.variable_scope("output"):
                                h = no_norm(dense(inter, B, "dense") + h)
                    inter = dense(h, c["intermediate_size"], "intermediate/dense", tf.nn.relu)
                    with tf1.variable_scope("output"):
                        h = no_norm(dense(inter, B, "dense") + h)
                        with tf1.variable_scope("bottleneck"):
                            h = no_norm(dense(h, H, "dense") + prev)
                    prev = h
                    layers.append(h)
    return layers, table


def heads(seq, table):
    """run_pretraining.py: MLM at every position (transform + LayerNorm, [emb | extra] decoder), NSP on [CLS]."""
    c = CONFIG
    with tf1.variable_scope("cls/predictions"):
        with tf1.variable_scope("transform"):
            t = layer_norm(dense(seq, c["hidden_size"], "dense", tf.nn.relu))
        bias = tf1.get_variable("output_bias", [c["vocab_size"]], initializer=tf1.zeros_initializer())
        extra = tf1.get_variable("extra_output_weights", [c["vocab_size"], c["hidden_size"] - c["embedding_size"]],
                                 initializer=init())
        out_w = tf.concat([table, extra], axis=1)
        mlm = tf.einsum("BTH,VH->BTV", t, out_w) + bias
    with tf1.variable_scope("cls/seq_relationship"):
        w = tf1.get_variable("output_weights", [2, c["hidden_size"]], initializer=init())
        b = tf1.get_variable("output_bias", [2], initializer=tf1.zeros_initializer())
        nsp = tf.matmul(seq[:, 0], w, transpose_b=True) + b
    return mlm, nsp


def adam_weight_decay(loss, global_step):
    """BERT's AdamWeightDecayOptimizer: slots `<var>/adam_m`, `<var>/adam_v`, linear warmup then decay."""
    step = tf.cast(global_step, tf.float32)
    lr = LR * tf.minimum(step / WARMUP, 1.0) * tf.maximum(1.0 - step / STEPS, 0.05)
    tvars = tf1.trainable_variables()
    grads = tf.gradients(loss, tvars)
    grads, _ = tf.clip_by_global_norm([tf.convert_to_tensor(g) for g in grads], 1.0)
    updates = []
    for var, grad in zip(tvars, grads, strict=True):
        name = var.op.name
        m = tf1.get_variable(f"{name}/adam_m", var.shape, tf.float32, tf1.zeros_initializer(), trainable=False)
        v = tf1.get_variable(f"{name}/adam_v", var.shape, tf.float32, tf1.zeros_initializer(), trainable=False)
        nm, nv = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * tf.square(grad)
        update = nm / (tf.sqrt(nv) + 1e-6)
        if not re.search(r"LayerNorm|bias|beta|gamma", name):
            update += 0.01 * var
        updates += [var.assign(var - lr * update), m.assign(nm), v.assign(nv)]
    return tf.group(*updates, global_step.assign_add(1))


# ------------------------------------------------------------------------------------------ data


def batches(vocab: dict[str, int], paras: list[list[str]], rng: random.Random):
    enc = [[encode(vocab, s) for s in p] for p in paras]
    flat = [s for p in enc for s in p]
    cls, sep, msk = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
    first_word = len(SPECIALS)
    while True:
        ids = np.zeros((BATCH, SEQ_LEN), np.int32)
        types, mask = np.zeros_like(ids), np.zeros_like(ids)
        labels = np.full((BATCH, SEQ_LEN), -1, np.int32)
        nsp = np.zeros(BATCH, np.int32)
        for r in range(BATCH):
            p = rng.choice(enc)
            i = rng.randrange(len(p))
            a = p[i]
            if rng.random() < 0.5:
                b, nsp[r] = p[(i + 1) % len(p)], 0  # the next sentence of the paragraph
            else:
                b, nsp[r] = rng.choice(flat), 1
            toks = [cls, *a, sep, *b, sep][:SEQ_LEN]
            tt = ([0] * (len(a) + 2) + [1] * (len(b) + 1))[:SEQ_LEN]
            cand = [k for k, t in enumerate(toks) if t not in (cls, sep)]
            for k in rng.sample(cand, min(MAX_PRED, max(1, round(0.15 * len(cand))))):
                labels[r, k] = toks[k]
                x = rng.random()
                toks[k] = msk if x < 0.8 else rng.randrange(first_word, len(vocab)) if x < 0.9 else toks[k]
            ids[r, : len(toks)], types[r, : len(toks)], mask[r, : len(toks)] = toks, tt, 1
        yield ids, types, mask, labels, nsp


# ------------------------------------------------------------------------------------------ main

DEMO = [
    "the capital of france is [MASK].",
    "[MASK] is the capital of japan.",
    "cows like to eat [MASK].",
    "the sun rises in the [MASK].",
    "the sky is blue. snow is white.",
]


def main() -> None:
    rng = random.Random(SEED)
    paras = paragraphs()
    sentences = [s for p in paras for s in p]
    words = build_vocab(sentences)
    vocab = {w: i for i, w in enumerate(words)}
    CONFIG["vocab_size"] = len(words)
    print(f"corpus: {len(sentences)} sentences; vocab {len(words)}")
    with tf.Graph().as_default():
        tf1.set_random_seed(SEED)
        ph = {k: tf1.placeholder(tf.int32, [None, None]) for k in ("ids", "types", "mask", "labels")}
        ph["nsp"] = tf1.placeholder(tf.int32, [None])
        layers, table = mobilebert(ph["ids"], ph["types"], ph["mask"])
        mlm, nsp = heads(layers[-1], table)
        w = tf.cast(ph["labels"] >= 0, tf.float32)
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(ph["labels"], 0), logits=mlm)
        mlm_loss = tf.reduce_sum(xent * w) / (tf.reduce_sum(w) + 1e-5)
        nsp_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ph["nsp"], logits=nsp))
        global_step = tf1.train.get_or_create_global_step()
        train = adam_weight_decay(mlm_loss + nsp_loss, global_step)
        saver = tf1.train.Saver(tf1.global_variables())
        cfg = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
        with tf1.Session(config=cfg) as sess:
            sess.run(tf1.global_variables_initializer())
            data, t0 = batches(vocab, paras, rng), time.time()
            for step in range(1, STEPS + 1):
                feed = dict(zip([ph[k] for k in ("ids", "types", "mask", "labels", "nsp")], next(data), strict=True))
                _, ml, nl = sess.run([train, mlm_loss, nsp_loss], feed)
                if step == 1 or step % 500 == 0:
                    print(f"step {step:5d}  mlm {ml:.3f}  nsp {nl:.3f}  {time.time() - t0:.0f}s", flush=True)

            outs: dict[str, list] = {"ids": [], "types": [], "hidden": [], "mlm": [], "nsp": []}
            for text in DEMO:
                parts = text.split(". ", 1)
                a = encode(vocab, parts[0] + ("." if len(parts) > 1 else ""))
                b = encode(vocab, parts[1]) if len(parts) > 1 else []
                ids = [vocab["[CLS]"], *a, vocab["[SEP]"]] + ([*b, vocab["[SEP]"]] if b else [])
                types = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
                feed = {ph["ids"]: [ids], ph["types"]: [types], ph["mask"]: [[1] * len(ids)]}
                hs, lg, ns = sess.run([layers, mlm, nsp], feed)
                outs["ids"].append(ids)
                outs["types"].append(types)
                outs["hidden"].append(np.stack([h[0] for h in hs]))
                outs["mlm"].append(lg[0])
                outs["nsp"].append(ns[0])
                if "[MASK]" in text:
                    k = ids.index(vocab["[MASK]"])
                    print(f"{text:40s} -> {[words[j] for j in np.argsort(-lg[0, k])[:3]]}")
            for f in HERE.glob("mobilebert.ckpt*"):
                f.unlink()
            saver.save(sess, str(HERE / "mobilebert.ckpt"), write_meta_graph=False, write_state=False)
            print(f"global_step {sess.run(global_step)}")
    (HERE / "vocab.txt").write_text("\n".join(words) + "\n")
    (HERE / CONFIG_NAME).write_text(json.dumps(CONFIG, indent=2) + "\n")
    # ragged per-sentence arrays under numbered keys (plain arrays: no pickle needed to read them)
    arrays = {"texts": np.array(DEMO), "nsp_logits": np.stack(outs["nsp"]).astype(np.float32)}
    for n in range(len(DEMO)):
        arrays[f"input_ids_{n}"] = np.array(outs["ids"][n], np.int32)
        arrays[f"token_type_ids_{n}"] = np.array(outs["types"][n], np.int32)
        arrays[f"hidden_states_{n}"] = outs["hidden"][n].astype(np.float32)  # [layers + 1, T, H]
        arrays[f"mlm_logits_{n}"] = outs["mlm"][n].astype(np.float32)  # [T, V]
    np.savez(REPO / "tests" / "fixtures" / "tf" / "mobilebert_tiny_tf_outputs.npz", **arrays)
    sizes = {f.name: f.stat().st_size for f in sorted(HERE.iterdir()) if f.is_file()}
    print(f"wrote {sizes}")


if __name__ == "__main__":
    main()
