"""Mistral / Mixtral raw releases -> HF: tensors, transformers logits, parity, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enc.cli.main import run
from tests.helpers.mistral_writer import TOKENIZER_V1, TOKENIZER_V3, inverse_permute, tiny_hf, write_release

transformers = pytest.importorskip("transformers")


def _logits_match(out_dir: Path, model, vocab: int, atol: float = 1e-4) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = hf(ids).logits, model(ids).logits
    assert (got - want).abs().max().item() < atol


def _enc(args: list[str], capsys) -> tuple[int, str, str]:
    rc = run(args)
    cap = capsys.readouterr()
    if rc == 0:  # rich wraps long warnings; compare them as one line
        return rc, cap.out, " ".join(cap.err.split())
    return rc, cap.out, cap.err


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if ".enc-tmp-" in p.name]


# ----------------------------------------------------------------------------- happy paths


@pytest.fixture(scope="module")
def dense():
    return tiny_hf(sliding_window=8)  # window < probe length: the window is exercised


@pytest.fixture(scope="module")
def mixtral():
    return tiny_hf(moe=True, rope_theta=1e6, vocab=32000)


def test_v01_pth_no_rope_theta(tmp_path, dense, capsys):
    src = write_release(tmp_path / "mistral-7B-v0.1", dense, rope_theta=False)
    out = tmp_path / "hf"
    rc, _, err = _enc(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["rope_theta"] == 10000.0 and cfg["sliding_window"] == 8  # v0.1 rule: window set -> 1e4
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(out))
    assert "no rope_theta" in err
    # tensors: q/k permuted back to exactly the HF model's, the rest copied
    sd = load_file(str(out / "model.safetensors"))
    ref = dense.state_dict()
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(sd[k], ref[k]), k
    raw = torch.load(src / "consolidated.00.pth", weights_only=True)
    assert not torch.equal(raw["layers.1.attention.wq.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    _logits_match(out, dense, 32000)
    prov = json.loads((out / "enc_provenance.json").read_text())
    assert prov["parity"]["verdict"] == "pass"


def test_v03_safetensors_bf16(tmp_path, capsys):
    model = tiny_hf(vocab=32768, rope_theta=1e6, seed=3)
    src = write_release(tmp_path / "Mistral-7B-v0.3", model, fmt="safetensors", tokenizer=TOKENIZER_V3,
                        tokenizer_name="tokenizer.model.v3", dtype=torch.bfloat16)
    out = tmp_path / "hf"
    rc, _, err = _enc(["convert", str(src), "-o", str(out), "--dtype", "bfloat16", "--json"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["sliding_window"] is None and cfg["vocab_size"] == 32768
    assert cfg["torch_dtype"] == "bfloat16"
    sd = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg  # a base release: no chat template unless asked
    rc, stdout, _ = _enc(["parity", str(src), str(out), "--json"], capsys)
    report = json.loads(stdout)
    assert rc == 0 and report["verdict"] == "pass" and report["dtype"] == "bfloat16"
    assert [r["name"] for r in report["rows"]] == ["embeddings", "layer.0", "layer.1", "final_norm", "logits"]


def test_mixtral_torrent_params_and_parity(tmp_path, mixtral, capsys):
    # the torrent params.json has neither rope_theta nor sliding_window: theta must become 1e6
    src = write_release(tmp_path / "Mixtral-8x7B-v0.1", mixtral, rope_theta=False, sliding_window=False)
    out = tmp_path / "hf"
    rc, _, err = _enc(["convert", str(src), "-o", str(out), "--shard-size", "4MB"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["rope_theta"] == 1e6 and cfg["sliding_window"] is None
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    _logits_match(out, mixtral, 32000)
    rc, stdout, _ = _enc(["parity", str(src), str(out), "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["verdict"] == "pass"


def test_mixtral_stacked_layer_split(tmp_path, mixtral, capsys):
    src = write_release(tmp_path / "mixtral-megablocks", mixtral, stacked_moe=True, layer_split=1)
    assert len(list(src.glob("consolidated.*.pt"))) == 2
    out = tmp_path / "hf"
    rc, _, err = _enc(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0, err
    _logits_match(out, mixtral, 32000)


def test_tensor_parallel_shards(tmp_path, dense, capsys):
    src = write_release(tmp_path / "tp2", dense, tp=2)
    assert len(list(src.glob("consolidated.0*.pth"))) == 2
    out = tmp_path / "hf"
    rc, stdout, err = _enc(["convert", str(src), "-o", str(out), "--dry-run", "--json"], capsys)
    assert rc == 0, err
    plan = json.loads(stdout)
    q = next(r for r in plan["map"] if r["hf"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["sources"] == ["consolidated.00.pth:layers.0.attention.wq.weight",
                            "consolidated.01.pth:layers.0.attention.wq.weight"]
    rc, _, err = _enc(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0, err
    _logits_match(out, dense, 32000)


def test_tied_output_and_overrides(tmp_path, capsys):
    model = tiny_hf(tied=True, seed=5)
    src = write_release(tmp_path / "tied", model, sliding_window=False, rope_theta=False)
    out = tmp_path / "hf"
    # no window, no theta would give 1e6; the model was built with 1e4: --rope-theta fixes it
    rc, _, err = _enc(["convert", str(src), "-o", str(out), "--rope-theta", "10000"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 10000.0
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    _logits_match(out, model, 32000)


def test_parity_pinpoints_skipped_permute(tmp_path, dense, capsys):
    src = write_release(tmp_path / "src", dense)
    out = tmp_path / "hf"
    assert _enc(["convert", str(src), "-o", str(out), "--no-verify"], capsys)[0] == 0
    path = out / "model.safetensors"
    sd = load_file(str(path))
    # a converter that forgot the q/k permute in layer 1
    sd["model.layers.1.self_attn.q_proj.weight"] = inverse_permute(sd["model.layers.1.self_attn.q_proj.weight"], 4)
    sd["model.layers.1.self_attn.k_proj.weight"] = inverse_permute(sd["model.layers.1.self_attn.k_proj.weight"], 2)
    save_file(sd, str(path), metadata={"format": "pt"})
    rc, stdout, _ = _enc(["parity", str(src), str(out), "--json"], capsys)
    report = json.loads(stdout)
    assert rc == 1 and report["verdict"] == "fail" and report["first_failure"] == "layer.1"
    assert [r["passed"] for r in report["rows"]][:2] == [True, True]


def test_tokenizer_json_equals_sentencepiece(tmp_path, dense, capsys):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from enc.tokenization import load_tokenizer

    texts = ["Hello world", "My favourite condiment is", " leading", "a  b   c\n\nd\te", "naïve café 🙂 日本語",
             "x=1; y = f(x) ** 2  # comment", "12,345.67 and -0.5%", "ÀÉÎÕÜ ßøå Привет мир", "😀😃😄 emoji run",
             "URLs: https://example.com/a?b=c&d=e", "tabs\tand\rcarriage", "end with space ", "", "\u2581x"]
    for spm_file, name in ((TOKENIZER_V1, "v1"), (TOKENIZER_V3, "v3")):
        model = dense if name == "v1" else tiny_hf(vocab=32768, seed=1)
        src = write_release(tmp_path / f"src-{name}", model, tokenizer=spm_file)
        out = tmp_path / f"hf-{name}"
        assert _enc(["convert", str(src), "-o", str(out), "--no-verify"], capsys)[0] == 0
        sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        fast = Tokenizer.from_file(str(out / "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(out)
        ours = load_tokenizer(out)
        for t in texts:
            want = [1] + sp.encode(t)
            assert ours.encode(t).ids == want, t
            assert fast.encode(t).ids == want, t
            assert hf(t).input_ids == want, t
            assert ours.decode(want) == sp.decode(want[1:])
    # the first word keeps its "▁" (the known converter bug drops it)
    assert load_tokenizer(tmp_path / "hf-v1").encode("Hello world").ids == [1, 22557, 1526]


def test_inspect_release(tmp_path, mixtral, capsys):
    src = write_release(tmp_path / "src", mixtral, stacked_moe=True)
    rc, stdout, _ = _enc(["inspect", str(src), "--json"], capsys)
    info = json.loads(stdout)
    assert rc == 0 and info["format"] == "mistral"
    assert info["summary"]["params"]["num_experts"] == 4
    assert "layers.0.block_sparse_moe.w2" in {t["name"] for t in info["tensors"]}


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def release(tmp_path, dense):
    return write_release(tmp_path / "src", dense)


def _fails(capsys, src: Path, out: Path, *extra: str, needle: str = "") -> str:
    rc, stdout, err = _enc(["convert", str(src), "-o", str(out), *extra], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("enc: error:"), err
    assert needle in lines[0], lines[0]
    _no_leftovers(out.parent, out.name)
    return lines[0]


def test_params_missing(tmp_path, release, capsys):
    (release / "params.json").unlink()
    _fails(capsys, release, tmp_path / "out", needle="params.json not found")


def test_params_invalid_json(tmp_path, release, capsys):
    (release / "params.json").write_text("{\"dim\": 64,")
    _fails(capsys, release, tmp_path / "out", needle="invalid JSON")


@pytest.mark.parametrize("patch,needle", [
    ({"n_heads": 8}, "disagrees with the weights"),
    ({"n_kv_heads": 4}, "disagrees with the weights"),
    ({"n_layers": 3}, "n_layers=3"),
    ({"vocab_size": 1000}, "disagrees with the weights"),
    ({"dim": "sixty-four"}, "dim must be an integer"),
    ({"moe": {"num_experts": 4, "num_experts_per_tok": 2}}, "moe section"),
])
def test_params_inconsistent(tmp_path, release, capsys, patch, needle):
    p = json.loads((release / "params.json").read_text())
    p.update(patch)
    (release / "params.json").write_text(json.dumps(p))
    _fails(capsys, release, tmp_path / "out", needle=needle)


def test_truncated_pth(tmp_path, release, capsys):
    f = release / "consolidated.00.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _fails(capsys, release, tmp_path / "out", needle="truncated or corrupted")


def test_truncated_safetensors(tmp_path, dense, capsys):
    src = write_release(tmp_path / "src", dense, fmt="safetensors")
    f = src / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(capsys, src, tmp_path / "out", needle="truncated")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_refused_not_executed(tmp_path, release, capsys):
    marker = tmp_path / "PWNED"
    sd = torch.load(release / "consolidated.00.pth", weights_only=True)
    sd["evil"] = _Payload(str(marker))
    torch.save(sd, release / "consolidated.00.pth")
    assert not marker.exists()
    _fails(capsys, release, tmp_path / "out", needle="refusing to load")
    assert not marker.exists()


def test_missing_tokenizer_warns(tmp_path, dense, capsys):
    src = write_release(tmp_path / "src", dense, tokenizer=None)
    out = tmp_path / "out"
    rc, _, err = _enc(["convert", str(src), "-o", str(out)], capsys)
    assert rc == 0
    assert "no tokenizer found" in err and "--tokenizer" in err
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.model").exists()
    # adding it as the warning says
    rc, _, err = _enc(["convert", str(src), "-o", str(out), "--force", "--tokenizer", str(TOKENIZER_V1)], capsys)
    assert rc == 0 and (out / "tokenizer.model").is_file()


def test_tekken_named_unsupported(tmp_path, dense, capsys):
    src = write_release(tmp_path / "src", dense, tokenizer=None)
    (src / "tekken.json").write_text("{}")
    rc, _, err = _enc(["convert", str(src), "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "tekken.json" in err and "not supported" in err


def test_unknown_keys(tmp_path, dense, capsys):
    src = write_release(tmp_path / "src", dense, extra={"layers.0.attention.wqkv_bias": torch.zeros(4)})
    _fails(capsys, src, tmp_path / "out", needle="unknown variable")


def test_mixed_pth_and_safetensors(tmp_path, release, capsys):
    shutil.copyfile(release / "consolidated.00.pth", release / "consolidated.safetensors")
    _fails(capsys, release, tmp_path / "out", needle="one format")


def test_byte_split_parts_explained(tmp_path, release, capsys):
    data = (release / "consolidated.00.pth").read_bytes()
    (release / "consolidated.00.pth").unlink()
    (release / "consolidated.00.pth-split0").write_bytes(data[:1000])
    (release / "consolidated.00.pth-split1").write_bytes(data[1000:])
    _fails(capsys, release, tmp_path / "out", needle="cat ")


# ----------------------------------------------------------------------------- bounded memory


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_pth_pages_not_resident_after_each_tensor(tmp_path):
    """Reading every tensor of a memory-mapped .pth leaves (almost) none of its pages resident."""
    from enc.converters.mistral import _pth_tensors

    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(2 * 2**20, generator=g) for i in range(8)}  # 8 x 8 MiB
    path = tmp_path / "consolidated.00.pth"
    torch.save(sd, path)
    lazy = _pth_tensors(path)
    before = _rss_file_kb()
    for k, t in lazy.items():
        got = t.load()
        assert torch.equal(got, sd[k])
        del got
    view = torch.arange(12.0).view(3, 4)
    torch.save({"t": view.t(), "s": view[1:, 1:]}, tmp_path / "views.pth")  # strided / offset tensors
    odd = _pth_tensors(tmp_path / "views.pth")
    assert torch.equal(odd["t"].load(), view.t()) and torch.equal(odd["s"].load(), view[1:, 1:])
    grown_mb = (_rss_file_kb() - before) / 1024
    assert grown_mb < 16, f"{grown_mb:.0f} MiB of the 64 MiB file stayed resident"


# ----------------------------------------------------------------------------- params.json fields


def _params(raw: dict, overrides: dict | None = None, moe: bool = False):
    import tempfile

    from enc.converters.mistral import read_params, resolve_params

    shapes = {"tok_embeddings.weight": (32000, 64), "layers.0.feed_forward.w1.weight": (96, 64),
              "layers.0.feed_forward.experts.0.w1.weight": (96, 64)}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "params.json"
        p.write_text(json.dumps(raw))
        return resolve_params(read_params(p, overrides or {}), shapes, p)


BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5}


def test_params_release_variants():
    v01 = _params({**BASE, "head_dim": 16, "hidden_dim": 96, "n_kv_heads": 2, "sliding_window": "4096",
                   "vocab_size": 32000})
    assert (v01.sliding_window, v01.rope_theta, v01.n_kv_heads) == (4096, 1e4, 2)
    v02 = _params({**BASE, "rope_theta": 1000000.0})  # no window key; inferred head_dim/hidden_dim/vocab
    assert (v02.sliding_window, v02.rope_theta, v02.head_dim, v02.hidden_dim, v02.vocab_size) == (None, 1e6, 16, 96,
                                                                                                   32000)
    mix = _params({**BASE, "moe": {"num_experts_per_tok": 2, "num_experts": 8}})
    assert (mix.num_experts, mix.num_experts_per_tok, mix.rope_theta, mix.sliding_window) == (8, 2, 1e6, None)
    alias = _params({**BASE, "_sliding_window": 32, "max_seq_len": 4096, "max_batch_size": 3})
    assert (alias.sliding_window, alias.max_seq_len) == (32, 4096)
    hf_style = _params({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-6,
                        "num_local_experts": 8, "num_key_value_heads": 2})
    assert (hf_style.dim, hf_style.num_experts, hf_style.norm_eps, hf_style.n_kv_heads) == (64, 8, 1e-6, 2)
    over = _params({**BASE, "sliding_window": 4096},
                   {"rope_theta": 5e5, "sliding_window": 0, "num_kv_heads": 1, "max_seq_len": 128})
    assert (over.rope_theta, over.sliding_window, over.n_kv_heads, over.max_seq_len) == (5e5, None, 1, 128)


@pytest.mark.parametrize("raw,needle", [
    ({**BASE, "model_type": "mamba"}, "not supported"),
    ({**BASE, "vision_encoder": {"x": 1}}, "Pixtral"),
    ({"dim": 64, "n_layers": 2}, "lacks 'n_heads'"),
    ({**BASE, "n_kv_heads": 3}, "not a multiple"),
    ({**BASE, "sliding_window": [4096, 8192]}, "per-layer sliding windows"),
    ({**BASE, "norm_eps": -1}, "positive"),
    ({**BASE, "moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "num_experts_per_tok 3 > num_experts 2"),
])
def test_params_rejected(raw, needle):
    from enc.errors import EncError

    with pytest.raises(EncError, match=needle):
        _params(raw)
