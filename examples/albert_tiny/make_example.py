"""Make examples/albert_tiny: a tiny ALBERT original release, trained with real TensorFlow.

Needs TensorFlow and sentencepiece (never installed in the project venv); CI does not run it.
From the repository root:

    python3 -m venv /work/tfenv && /work/tfenv/bin/pip install tensorflow-cpu sentencepiece
    /work/tfenv/bin/python examples/albert_tiny/make_example.py

What it does, in the way google-research/albert does it:
  1. trains a sentencepiece unigram model `30k-clean.model` on the small English corpus below with
     ALBERT's options (pad_id=0 unk_id=1 eos/bos -1, control symbols [CLS],[SEP],[MASK], the same
     user-defined punctuation symbols);
  2. builds the ALBERT graph with tf.compat.v1 variables under the exact original names
     (bert/embeddings/..., bert/encoder/transformer/group_0/inner_group_0/..., cls/predictions/...,
     cls/seq_relationship/...): tanh-GELU, LayerNorm eps 1e-12, factorised embeddings, one shared
     group for all layers;
  3. trains it with masked-LM + sentence-order prediction and ALBERT/BERT's AdamWeightDecay
     optimizer, whose slots are `<var>/adam_m` and `<var>/adam_v`;
  4. saves every global variable (weights, Adam slots, global_step) with tf.compat.v1.train.Saver
     as `model.ckpt-best` (the .meta graph is not kept), and writes `albert_config.json`;
  5. prints fill-mask predictions from the TF graph and stores TF's outputs for a few sentences in
     tests/fixtures/tf/albert_tiny_tf_outputs.npz, so a converted model can be checked against TF.

Deterministic up to TF's CPU thread scheduling. About 3-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

CONFIG = {
    "attention_probs_dropout_prob": 0.0,
    "hidden_dropout_prob": 0.0,
    "embedding_size": 32,
    "hidden_act": "gelu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_hidden_groups": 1,
    "inner_group_num": 1,
    "type_vocab_size": 2,
    "vocab_size": 0,  # set from the trained sentencepiece model
    "down_scale_factor": 1,
    "net_structure_type": 0,
    "gap_size": 0,
    "num_memory_blocks": 0,
}
SEQ_LEN, MAX_PREDICTIONS, BATCH = 40, 8, 64
STEPS = int(os.environ.get("ALBERT_TINY_STEPS", 5000))
LEARNING_RATE, WARMUP = 3e-3, 300
SEED = 1234

# ------------------------------------------------------------------------------------------ corpus
# Paragraphs of related sentences (consecutive pairs feed sentence-order prediction).
PARAGRAPHS = [
    # plants
    """Plants create energy through photosynthesis. Photosynthesis uses sunlight, water and carbon dioxide.
    Leaves are green because they contain chlorophyll. The roots of a plant take water from the soil.
    Plants need sunlight and water to grow. Trees release oxygen into the air. Flowers attract bees
    with their color and smell. Bees carry pollen from one flower to another. Seeds grow into new
    plants when they get water. A cactus stores water in its thick stem. Many trees lose their
    leaves in autumn. Farmers plant seeds in the spring. Tall trees give shade on hot days.""",
    """The sun gives plants the light they need. Without light, plants cannot make food. Green
    leaves catch the light of the sun. Plants turn light into energy and sugar. Animals get energy
    by eating plants. Fruit grows from the flowers of a plant. Apples and oranges grow on trees.
    Rice grows in wet fields. Wheat is used to make flour.""",
    # animals
    """The cat sat on the mat. The dog ran across the park. Birds build nests in the trees. Fish
    swim in rivers, lakes and the sea. Elephants are the largest animals on land. Whales are large
    animals that live in the ocean. Penguins cannot fly, but they swim very well. The owl hunts at
    night. Frogs lay their eggs in water. Snakes have no legs. Horses can run very fast. Bats sleep
    during the day and fly at night. The giraffe has a very long neck. The cheetah is the fastest
    animal on land.""",
    """A young dog is called a puppy. A young cat is called a kitten. A young cow is called a calf.
    A young sheep is called a lamb. A young horse is called a foal. A young frog is called a
    tadpole.""",
    # the sky, the earth and the weather
    """The sun rises in the east. The sun sets in the west. The moon goes around the earth. The
    earth goes around the sun. The earth takes one year to go around the sun. Stars shine in the
    sky at night. The moon shines at night. Mars is called the red planet. Jupiter is the largest
    planet.""",
    """Water freezes into ice when it is cold. Water boils when it is very hot. Rain falls from the
    clouds. Snow falls in winter. Summer is the warmest season of the year. Winter is the coldest
    season of the year. Strong winds blow during a storm. After the rain we can see a rainbow. The
    weather is hot and dry in the desert.""",
    # geography
    """The nile is the longest river in africa. Mount everest is the highest mountain in the world.
    The sahara is a large desert in africa. The pacific is the largest ocean on earth. Africa and
    asia are large continents. Many people live near rivers. Islands are surrounded by water.""",
    # food and cooking
    """Bread is made from flour, water and yeast. The baker bakes bread early in the morning. We
    drink coffee in the morning. Soup is served hot. Ice cream is cold and sweet. Lemons taste
    sour. Honey is sweet. Vegetables are good for your health. We cook food on a stove. We keep
    milk cold in the fridge.""",
    # the body and health
    """The heart pumps blood through the body. We breathe with our lungs. We see with our eyes. We
    hear with our ears. We smell with our nose. We taste with our tongue. Sleep helps the body rest.
    Exercise makes the body strong. We brush our teeth every morning and every night.""",
    # daily life
    """Children go to school in the morning. The teacher writes on the board. Students read books in
    the library. We eat lunch at noon. The bus stops in front of the school. My father drives a car
    to work. My mother reads the newspaper. We play football in the park. We go to bed at night.""",
    """We wash our hands before we eat. The family eats dinner together in the evening. My sister
    plays the piano. My brother plays the guitar. The baby sleeps in a small bed. We clean the house
    on saturday. Grandmother tells us stories before bed. We water the garden in the evening.""",
    """The shop opens at nine in the morning. People buy food at the market. The train leaves the
    station at noon. A bicycle has two wheels. A car has four wheels. We use an umbrella when it
    rains. We wear a coat when it is cold. The phone rings in the kitchen.""",
    # travel and transport
    """Planes fly high above the clouds. Ships sail across the sea. Trains run on rails. Cars drive
    on the road. A boat floats on the water. The pilot flies the plane. The captain steers the ship.
    We wait for the bus at the bus stop. People ride bicycles to work in the city.""",
    # music and sport
    """Music makes people happy. We sing songs at birthday parties. The drum makes a loud sound. A
    football team has eleven players. Swimmers swim in the pool. Runners run around the track. The
    team that scores the most goals wins the game.""",
    # the house
    """We sleep in the bedroom. We cook in the kitchen. We take a bath in the bathroom. We watch
    television in the living room. The door opens with a key. Windows let light into the room. The
    lamp lights the room at night. The roof keeps the rain out of the house.""",
    # school subjects
    """In science class we learn about plants and animals. In math class we learn to count and add
    numbers. In history class we learn about the past. In music class we learn to sing. In art class
    we paint pictures. Two plus two is four. Ten minus three is seven.""",
    # the sea
    """The sea is full of salt water. Waves crash on the beach. Sharks are fish with sharp teeth.
    Dolphins are smart and friendly animals. Crabs walk sideways on the sand. Coral reefs are home to
    many fish. The tide rises and falls twice a day.""",
]

CAPITALS = [("paris", "france"), ("berlin", "germany"), ("rome", "italy"), ("madrid", "spain"),
            ("london", "england"), ("tokyo", "japan"), ("cairo", "egypt"), ("ottawa", "canada"),
            ("lisbon", "portugal"), ("athens", "greece"), ("moscow", "russia"), ("beijing", "china"),
            ("dublin", "ireland"), ("vienna", "austria"), ("oslo", "norway"), ("nairobi", "kenya"),
            ("lima", "peru"), ("canberra", "australia")]  # fmt: skip
FOODS = [("cows", "grass"), ("rabbits", "carrots"), ("monkeys", "bananas"), ("pandas", "bamboo"),
         ("cats", "fish"), ("horses", "hay"), ("birds", "seeds"), ("bears", "honey"), ("mice", "cheese"),
         ("sheep", "grass"), ("squirrels", "nuts"), ("lions", "meat")]  # fmt: skip
SOUNDS = [("dogs", "bark"), ("cats", "meow"), ("cows", "moo"), ("lions", "roar"), ("birds", "sing"),
          ("snakes", "hiss"), ("ducks", "quack"), ("horses", "neigh"), ("wolves", "howl"), ("bees", "buzz")]  # fmt: skip
HOMES = [("fish", "the water"), ("birds", "nests"), ("bees", "hives"), ("bears", "caves"),
         ("penguins", "antarctica"), ("camels", "the desert"), ("monkeys", "the jungle"),
         ("kangaroos", "australia"), ("pandas", "china"), ("polar bears", "the arctic"),
         ("lions", "africa"), ("cows", "farms")]  # fmt: skip
COLORS = [("the sky is", "blue"), ("grass is", "green"), ("snow is", "white"), ("blood is", "red"),
          ("coal is", "black"), ("a banana is", "yellow"), ("an orange is", "orange"), ("milk is", "white"),
          ("leaves are", "green"), ("the sun is", "yellow"), ("the sea is", "blue"), ("chocolate is", "brown")]  # fmt: skip
COUNTS = [("a week has", "seven", "days"), ("a year has", "twelve", "months"), ("a day has", "twenty four", "hours"),
          ("an hour has", "sixty", "minutes"), ("a spider has", "eight", "legs"), ("an insect has", "six", "legs"),
          ("a dog has", "four", "legs"), ("a bird has", "two", "legs"), ("a triangle has", "three", "sides"),
          ("a square has", "four", "sides"), ("a hand has", "five", "fingers")]  # fmt: skip
JOBS = [("teachers", "schools"), ("doctors", "hospitals"), ("farmers", "fields"), ("bakers", "bakeries"),
        ("chefs", "kitchens"), ("pilots", "planes"), ("sailors", "ships"), ("nurses", "hospitals"),
        ("scientists", "laboratories"), ("miners", "mines"), ("waiters", "restaurants")]  # fmt: skip
MATERIALS = [("bread", "flour"), ("cheese", "milk"), ("paper", "wood"), ("glass", "sand"), ("wine", "grapes"),
             ("butter", "cream"), ("chocolate", "cocoa"), ("jam", "fruit"), ("juice", "fruit"), ("tea", "leaves")]  # fmt: skip


def fact_paragraphs() -> list[list[str]]:
    """Short templated facts, a few phrasings each, so fill-mask has something definite to learn."""
    out = [
        [f"{c} is the capital of {k}." for c, k in CAPITALS],
        [f"the capital of {k} is {c}." for c, k in CAPITALS],
        [f"{c} is a big city in {k}." for c, k in CAPITALS],
        [f"{a} like to eat {f}." for a, f in FOODS] + [f"{a} eat {f} every day." for a, f in FOODS],
        [f"{a} {s}." for a, s in SOUNDS] + [f"you can hear {a} {s} at the farm." for a, s in SOUNDS[:4]],
        [f"{a} live in {h}." for a, h in HOMES],
        [f"{x} {c}." for x, c in COLORS],
        [f"{x} {n} {u}." for x, n, u in COUNTS],
        [f"{j} work in {p}." for j, p in JOBS],
        [f"{x} is made from {m}." for x, m in MATERIALS],
    ]
    return out


def corpus() -> list[list[str]]:
    """Lower-cased paragraphs of sentences (ALBERT English models are uncased)."""
    paragraphs = []
    for text in PARAGRAPHS:
        text = re.sub(r"\s+", " ", text.strip()).lower()
        paragraphs.append([s.strip() + "." for s in text.split(".") if s.strip()])
    return paragraphs + fact_paragraphs()


# Fill-mask checks: (sentence with [MASK], expected top-1 word).
DEMO = [
    ("plants create [MASK] through photosynthesis.", "energy"),
    ("paris is the capital of [MASK].", "france"),
    ("the capital of japan is [MASK].", "tokyo"),
    ("the sun rises in the [MASK].", "east"),
    ("cows like to eat [MASK].", "grass"),
    ("a week has seven [MASK].", "days"),
    ("the heart pumps [MASK] through the body.", "blood"),
    ("penguins live in [MASK].", "antarctica"),
]


# --------------------------------------------------------------------------------------- tokenizer


def train_sentencepiece(sentences: list[str], out: Path) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # The unigram seed only holds substrings repeated with varying right context; in so small
        # and templated a corpus most words never qualify and would stay split into fragments. Each
        # word is therefore also given on a line of its own.
        sentence_iterator=iter(
            sentences * 3 + sorted({w for s in sentences for w in re.findall(r"[^\W\d_]+", s)}) * 5
        ),
        model_writer=model,
        model_type="unigram",
        vocab_size=800,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        eos_id=-1,
        bos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        user_defined_symbols=["(", ")", '"', "-", ".", "–", "£", "€"],
        character_coverage=1.0,
        num_threads=2,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out))


def encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """Like HF AlbertTokenizer on lower-case ASCII text: [MASK] is a special token, the rest is spm."""
    mask = sp.piece_to_id("[MASK]")
    ids: list[int] = []
    for i, chunk in enumerate(text.split("[MASK]")):
        if i:
            ids.append(mask)
        if chunk.strip():
            ids += sp.encode(chunk.strip().lower())
    return ids


# ----------------------------------------------------------------------------- the ALBERT graph


def gelu(x):
    """google-research/albert modeling.gelu (tanh approximation)."""
    return 0.5 * x * (1.0 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * tf.pow(x, 3))))


def init():
    return tf1.truncated_normal_initializer(stddev=CONFIG["initializer_range"])


def layer_norm(x, name: str):
    """contrib layers.layer_norm over the last axis, epsilon 1e-12, variables gamma/beta."""
    dim = x.shape[-1]
    with tf1.variable_scope(name):
        gamma = tf1.get_variable("gamma", [dim], initializer=tf1.ones_initializer())
        beta = tf1.get_variable("beta", [dim], initializer=tf1.zeros_initializer())
    mean, var = tf.nn.moments(x, [-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-12) * gamma + beta


def dense(x, units: int, name: str, activation=None):
    """A dense layer with variables name/kernel [in, out] and name/bias [out]."""
    with tf1.variable_scope(name):
        kernel = tf1.get_variable("kernel", [x.shape[-1], units], initializer=init())
        bias = tf1.get_variable("bias", [units], initializer=tf1.zeros_initializer())
    y = tf.tensordot(x, kernel, 1) + bias  # (an einsum with "..." has a 50x slower gradient)
    return activation(y) if activation is not None else y


def attention_ffn_block(x, mask_adder):
    """modeling.attention_ffn_block: self-attention, residual + LayerNorm, FFN, residual + LayerNorm_1."""
    h, n = CONFIG["hidden_size"], CONFIG["num_attention_heads"]
    d = h // n
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]

    def heads(t):
        return tf.transpose(tf.reshape(t, [batch, seq, n, d]), [0, 2, 1, 3])

    with tf1.variable_scope("attention_1"):
        with tf1.variable_scope("self"):
            q, k, v = (heads(dense(x, h, p)) for p in ("query", "key", "value"))
            scores = tf.matmul(q, k, transpose_b=True) / np.sqrt(d) + mask_adder[:, None, None, :]
            context = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
            context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, seq, h])
        with tf1.variable_scope("output"):
            attention = dense(context, h, "dense")
    x = layer_norm(attention + x, "LayerNorm")
    with tf1.variable_scope("ffn_1"):
        with tf1.variable_scope("intermediate"):
            inner = dense(x, CONFIG["intermediate_size"], "dense", gelu)
            with tf1.variable_scope("output"):
                ffn = dense(inner, h, "dense")
    return layer_norm(ffn + x, "LayerNorm_1")


def albert(input_ids, token_type_ids, input_mask):
    """AlbertModel: returns (embedding_output, sequence_output, pooled_output, word_embeddings)."""
    c = CONFIG
    seq = tf.shape(input_ids)[1]
    with tf1.variable_scope("bert"):
        with tf1.variable_scope("embeddings"):
            word = tf1.get_variable(
                "word_embeddings", [c["vocab_size"], c["embedding_size"]], initializer=init()
            )
            types = tf1.get_variable("token_type_embeddings", [c["type_vocab_size"], c["embedding_size"]],
                                     initializer=init())  # fmt: skip
            positions = tf1.get_variable("position_embeddings", [c["max_position_embeddings"], c["embedding_size"]],
                                         initializer=init())  # fmt: skip
            emb = tf.gather(word, input_ids) + tf.gather(types, token_type_ids) + positions[None, :seq]
            emb = layer_norm(emb, "LayerNorm")
        with tf1.variable_scope("encoder"):
            x = dense(emb, c["hidden_size"], "embedding_hidden_mapping_in")
            mask_adder = (1.0 - tf.cast(input_mask, tf.float32)) * -10000.0
            with tf1.variable_scope("transformer", reuse=tf1.AUTO_REUSE):
                for layer in range(c["num_hidden_layers"]):
                    group = int(layer / c["num_hidden_layers"] * c["num_hidden_groups"])
                    with tf1.variable_scope(f"group_{group}"), tf.name_scope(f"layer_{layer}"):
                        for inner in range(c["inner_group_num"]):
                            with tf1.variable_scope(f"inner_group_{inner}"):
                                x = attention_ffn_block(x, mask_adder)
        with tf1.variable_scope("pooler"):
            pooled = dense(x[:, 0], c["hidden_size"], "dense", tf.tanh)
    return emb, x, pooled, word


def heads(sequence, pooled, word, positions):
    """run_pretraining's cls/predictions (tied to word_embeddings) and cls/seq_relationship."""
    c = CONFIG
    gathered = tf.gather(sequence, positions, batch_dims=1)  # [B, P, H]
    with tf1.variable_scope("cls/predictions"):
        with tf1.variable_scope("transform"):
            t = dense(gathered, c["embedding_size"], "dense", gelu)
            t = layer_norm(t, "LayerNorm")
        bias = tf1.get_variable("output_bias", [c["vocab_size"]], initializer=tf1.zeros_initializer())
        mlm_logits = tf.einsum("bpe,ve->bpv", t, word) + bias
    with tf1.variable_scope("cls/seq_relationship"):
        w = tf1.get_variable("output_weights", [2, c["hidden_size"]], initializer=init())
        b = tf1.get_variable("output_bias", [2], initializer=tf1.zeros_initializer())
        sop_logits = tf.matmul(pooled, w, transpose_b=True) + b
    return mlm_logits, sop_logits


def adam_weight_decay(loss, global_step):
    """BERT/ALBERT AdamWeightDecayOptimizer (no bias correction), slots <var>/adam_m and <var>/adam_v."""
    step = tf.cast(global_step, tf.float32)
    lr = LEARNING_RATE * tf.minimum(step / WARMUP, 1.0) * tf.maximum(1.0 - step / STEPS, 0.0)
    tvars = tf1.trainable_variables()
    grads = tf1.gradients(loss, tvars)
    grads, _ = tf.clip_by_global_norm([tf.convert_to_tensor(g) for g in grads], 1.0)
    updates = []
    for grad, var in zip(grads, tvars, strict=True):
        name = var.op.name
        m = tf1.get_variable(
            f"{name}/adam_m", var.shape, tf.float32, tf1.zeros_initializer(), trainable=False
        )
        v = tf1.get_variable(
            f"{name}/adam_v", var.shape, tf.float32, tf1.zeros_initializer(), trainable=False
        )
        next_m = 0.9 * m + 0.1 * grad
        next_v = 0.999 * v + 0.001 * tf.square(grad)
        update = next_m / (tf.sqrt(next_v) + 1e-6)
        if not re.search(r"LayerNorm|layer_norm|bias", name):
            update += 0.01 * var
        updates += [var.assign(var - lr * update), m.assign(next_m), v.assign(next_v)]
    return tf.group(*updates, global_step.assign_add(1))


# ------------------------------------------------------------------------------------ training data


class Batcher:
    def __init__(self, sp: spm.SentencePieceProcessor, paragraphs: list[list[str]], rng: random.Random):
        self.rng = rng
        encoded = [[encode(sp, s) for s in p] for p in paragraphs]
        self.sentences = [s for p in encoded for s in p]
        # Sentence order is only learnable where the order means something: the written paragraphs.
        self.pairs = [(p[i], p[i + 1]) for p in encoded[: len(PARAGRAPHS)] for i in range(len(p) - 1)]
        self.cls, self.sep, self.mask = (sp.piece_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
        self.space = sp.piece_to_id("\u2581")
        self.vocab = sp.get_piece_size()
        self.first_normal = 5  # after <pad> <unk> [CLS] [SEP] [MASK]
        self.joins = [
            not sp.id_to_piece(i).startswith("\u2581") and not sp.is_control(i) for i in range(self.vocab)
        ]

    def example(self):
        rng = self.rng
        if rng.random() < 0.5:  # single sentence, no SOP label
            a = rng.choice(self.sentences)
            tokens, types, sop, sop_w = [self.cls, *a, self.sep], [0] * (len(a) + 2), 0, 0.0
        else:
            a, b = rng.choice(self.pairs)
            sop = int(rng.random() < 0.5)  # 1 = swapped (ALBERT's is_random_next)
            if sop:
                a, b = b, a
            tokens = [self.cls, *a, self.sep, *b, self.sep]
            types, sop_w = [0] * (len(a) + 2) + [1] * (len(b) + 1), 1.0
        limit = SEQ_LEN - MAX_PREDICTIONS  # room for the inserted "\u2581" below
        tokens, types = tokens[:limit], types[:limit]
        candidates = [i for i, t in enumerate(tokens) if t not in (self.cls, self.sep)]
        n = min(MAX_PREDICTIONS, max(1, round(0.15 * len(candidates))))
        chosen = set(rng.sample(candidates, n))
        ids, segments, positions, labels = [], [], [], []
        for i, (tok, seg) in enumerate(zip(tokens, types, strict=True)):
            if i in chosen:
                positions.append(len(ids))
                labels.append(tok)
                r = rng.random()
                tok = (
                    self.mask if r < 0.8 else rng.randrange(self.first_normal, self.vocab) if r < 0.9 else tok
                )
            ids.append(tok)
            segments.append(seg)
            # Written text "seven [MASK]." reaches the model as [MASK] \u2581 . from HF's slow
            # tokenizer (and enc's), but as [MASK] . from HF's fast one: teach it both.
            if tok == self.mask and i + 1 < len(tokens) and self.joins[tokens[i + 1]] and rng.random() < 0.5:
                ids.append(self.space)
                segments.append(seg)
        return ids, segments, positions, labels, sop, sop_w

    def batch(self):
        ids = np.zeros((BATCH, SEQ_LEN), np.int32)
        types, mask = np.zeros_like(ids), np.zeros_like(ids)
        pos = np.zeros((BATCH, MAX_PREDICTIONS), np.int32)
        labels, weights = np.zeros_like(pos), np.zeros((BATCH, MAX_PREDICTIONS), np.float32)
        sop, sop_w = np.zeros(BATCH, np.int32), np.zeros(BATCH, np.float32)
        for i in range(BATCH):
            t, ty, p, lab, s, sw = self.example()
            ids[i, : len(t)], types[i, : len(t)], mask[i, : len(t)] = t, ty, 1
            pos[i, : len(p)], labels[i, : len(p)], weights[i, : len(p)] = p, lab, 1.0
            sop[i], sop_w[i] = s, sw
        return ids, types, mask, pos, labels, weights, sop, sop_w


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    rng = random.Random(SEED)
    np.random.seed(SEED)
    paragraphs = corpus()
    sentences = [s for p in paragraphs for s in p]
    print(f"corpus: {len(sentences)} sentences in {len(paragraphs)} paragraphs")
    tmp = Path(tempfile.mkdtemp(prefix="albert-tiny-"))
    sp = train_sentencepiece(sentences, tmp / "30k-clean.model")
    CONFIG["vocab_size"] = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    for _, word in DEMO:
        assert len(sp.encode(word)) == 1, f"{word!r} is not a single piece: {sp.encode(word, out_type=str)}"
    print(f"sentencepiece: {CONFIG['vocab_size']} pieces")

    batcher = Batcher(sp, paragraphs, rng)
    with tf.Graph().as_default():
        tf1.set_random_seed(SEED)
        ph = {
            "ids": tf1.placeholder(tf.int32, [None, None]),
            "types": tf1.placeholder(tf.int32, [None, None]),
            "mask": tf1.placeholder(tf.int32, [None, None]),
            "pos": tf1.placeholder(tf.int32, [None, None]),
            "labels": tf1.placeholder(tf.int32, [None, None]),
            "weights": tf1.placeholder(tf.float32, [None, None]),
            "sop": tf1.placeholder(tf.int32, [None]),
            "sop_w": tf1.placeholder(tf.float32, [None]),
        }
        emb, seq_out, pooled, word = albert(ph["ids"], ph["types"], ph["mask"])
        mlm_logits, sop_logits = heads(seq_out, pooled, word, ph["pos"])
        mlm_loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ph["labels"], logits=mlm_logits)
            * ph["weights"]
        ) / (tf.reduce_sum(ph["weights"]) + 1e-5)
        sop_loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ph["sop"], logits=sop_logits) * ph["sop_w"]
        ) / (tf.reduce_sum(ph["sop_w"]) + 1e-5)
        global_step = tf1.train.get_or_create_global_step()
        train_op = adam_weight_decay(mlm_loss + sop_loss, global_step)
        saver = tf1.train.Saver(tf1.global_variables())
        config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
        with tf1.Session(config=config) as sess:
            sess.run(tf1.global_variables_initializer())
            start = time.time()
            for step in range(1, STEPS + 1):
                values = dict(zip(ph.values(), batcher.batch(), strict=True))
                _, ml, sl = sess.run([train_op, mlm_loss, sop_loss], values)
                if step % 500 == 0 or step == 1:
                    print(
                        f"step {step:5d}  mlm {ml:.3f}  sop {sl:.3f}  {time.time() - start:.0f}s", flush=True
                    )

            def run_ids(rows: list[list[int]]):
                """TF outputs for id rows holding one [MASK] each (single segment, padded)."""
                width = max(map(len, rows))
                ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
                mask = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
                pos = np.array([[r.index(batcher.mask)] for r in rows], np.int32)
                feed = {ph["ids"]: ids, ph["types"]: np.zeros_like(ids), ph["mask"]: mask, ph["pos"]: pos}
                return ids, mask, pos, sess.run([emb, seq_out, pooled, mlm_logits, sop_logits], feed)

            def rows_for(texts: list[str], fast: bool) -> list[list[int]]:
                """enc / HF slow tokenizer: [MASK] \u2581 . ; HF fast (tokenizers): [MASK] ."""
                rows = []
                for t in texts:
                    ids = [batcher.cls, *encode(sp, t), batcher.sep]
                    if fast:
                        k = ids.index(batcher.mask)
                        if ids[k + 1] == batcher.space and batcher.joins[ids[k + 2]]:
                            del ids[k + 1]
                    rows.append(ids)
                return rows

            ids, mask, pos, (e, s, p, logits, sop) = run_ids(rows_for([t for t, _ in DEMO], fast=False))
            ok = 0
            for (text, want), row in zip(DEMO, logits[:, 0], strict=True):
                top = [sp.id_to_piece(int(i)).lstrip("\u2581") for i in np.argsort(-row)[:5]]
                ok += top[0] == want
                print(f"{text:50s} -> {top}")
            fast_logits = run_ids(rows_for([t for t, _ in DEMO], fast=True))[3][3][:, 0]
            fast_ok = sum(
                sp.id_to_piece(int(r.argmax())) == "\u2581" + w for (_, w), r in zip(DEMO, fast_logits)
            )
            print(
                f"fill-mask top-1: {ok}/{len(DEMO)} demo sentences (enc/HF slow), {fast_ok}/{len(DEMO)} (HF fast)"
            )
            # Mask each corpus word that is one piece, in the written text; top-1 accuracy.
            queries = []
            for sentence in sentences:
                words = sentence.split(" ")
                for i, word in enumerate(words):
                    bare = word.rstrip(".,")
                    piece = sp.piece_to_id("\u2581" + bare)
                    if bare and piece != sp.unk_id():
                        masked = " ".join(words[:i] + ["[MASK]" + word[len(bare) :]] + words[i + 1 :])
                        queries.append((masked, piece))
            for fast in (False, True):
                right = 0
                for k in range(0, len(queries), 256):
                    chunk = queries[k : k + 256]
                    lg = run_ids(rows_for([q for q, _ in chunk], fast))[3][3][:, 0]
                    right += int(sum(lg[j].argmax() == want for j, (_, want) in enumerate(chunk)))
                name = "HF fast" if fast else "enc/HF slow"
                print(f"fill-mask top-1 accuracy over every corpus word ({name}): {right}/{len(queries)}")

            for f in ("model.ckpt-best.index", "model.ckpt-best.data-00000-of-00001"):
                (HERE / f).unlink(missing_ok=True)
            saver.save(sess, str(HERE / "model.ckpt-best"), write_meta_graph=False, write_state=False)
    shutil.copy(tmp / "30k-clean.model", HERE / "30k-clean.model")
    shutil.rmtree(tmp)
    (HERE / "albert_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    np.savez(
        REPO / "tests" / "fixtures" / "tf" / "albert_tiny_tf_outputs.npz",
        sentences=np.array([t for t, _ in DEMO]),
        input_ids=ids,
        attention_mask=mask,
        mask_positions=pos[:, 0],
        embedding_output=e,
        sequence_output=s,
        pooled_output=p,
        mlm_logits_at_mask=logits[:, 0],
        sop_logits=sop,
    )
    sizes = {f.name: f.stat().st_size for f in sorted(HERE.iterdir()) if f.is_file()}
    print(f"wrote {sizes} ({sum(sizes.values())} bytes)")


if __name__ == "__main__":
    main()
