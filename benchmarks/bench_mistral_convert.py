"""Conversion of a Mistral-7B-geometry raw release: wall time vs cp, peak RSS, vs transformers' approach.

Writes a raw release with Mistral 7B v0.1's geometry (dim 4096, 32 heads, 8 KV heads, FFN 14336,
vocab 32000, bf16) and N layers (default 4; ``--layers 32`` is the full 14.5 GB model) as
``consolidated.00.pth``. The .pth is written by a streaming torch-zip writer (below), so even
the 14.5 GB file never has to sit in this process's memory. Then, each in a fresh process:

- ``cp`` of the same bytes (the floor for any conversion that has to write them);
- ``enc convert --no-verify`` (the pure conversion) and ``enc convert`` (with its layer-streamed
  parity check), peak RSS = the process's VmHWM (``ru_maxrss`` is not used for the Python runs: it
  keeps the forking parent's high-water mark across exec);
- with ``--peer`` (default on for <= 4 layers): transformers' own approach, as in its
  ``convert_mistral_weights_to_hf.py``: ``torch.load`` everything, permute q/k, assign into a
  ``MistralForCausalLM`` on the meta device and ``save_pretrained``.

Everything it writes goes into one temp directory that is deleted at the end (disk is shared).
Usage: python benchmarks/bench_mistral_convert.py [--layers 4] [--dir /tmp] [--no-peer]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

D, H, KV, HD, FF, V = 4096, 32, 8, 128, 14336, 32000
_STORAGE = {torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage", torch.float16: "HalfStorage"}


# --------------------------------------------------------------------------- a streaming .pth writer


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, proto):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.insert(0, acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_pth(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> int:
    """torch.save's zip layout, written tensor by tensor (random data); returns bytes of tensor data."""
    import io

    archive = path.name.rsplit(".", 1)[0]
    keys = {name: f"{i}" for i, name in enumerate(shapes)}
    obj = {name: _Tensor(_Storage(keys[name], dtype, int(torch.Size(s).numel())), s) for name, s in shapes.items()}
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    total = 0
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
        def record(name: str, data: bytes | None = None, nbytes: int = 0, chunks=None) -> None:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = len(data) if data is not None else nbytes
            # pad the local header so the data starts 64-byte aligned, as torch's writer does
            header = 30 + len(info.filename.encode())
            pad = (-(raw.tell() + header + 4)) % 64
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
            with zf.open(info, "w") as f:
                if data is not None:
                    f.write(data)
                else:
                    for c in chunks:
                        f.write(c)

        record("data.pkl", buf.getvalue())
        record("byteorder", b"little")
        for name, s in shapes.items():
            numel = int(torch.Size(s).numel())

            def chunks(numel=numel, name=name):
                step = 32 * 2**20
                for start in range(0, numel, step):
                    n = min(step, numel - start)
                    t = (1.0 + 0.1 * torch.randn(n, generator=g)) if name.endswith("norm.weight") else \
                        torch.randn(n, generator=g) * 0.02
                    yield t.to(dtype).view(torch.uint8).numpy().tobytes()

            record(f"data/{keys[name]}", nbytes=numel * dtype.itemsize, chunks=chunks())
            total += numel * dtype.itemsize
        record("version", b"3\n")
        record(".data/serialization_id", b"0" * 40)
    return total


def raw_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,),
            p + "attention.wq.weight": (H * HD, D), p + "attention.wk.weight": (KV * HD, D),
            p + "attention.wv.weight": (KV * HD, D), p + "attention.wo.weight": (D, H * HD),
            p + "feed_forward.w1.weight": (FF, D), p + "feed_forward.w2.weight": (D, FF),
            p + "feed_forward.w3.weight": (FF, D),
        })
    return shapes


def write_release(d: Path, layers: int) -> int:
    d.mkdir(parents=True)
    params = {"dim": D, "n_layers": layers, "head_dim": HD, "hidden_dim": FF, "n_heads": H, "n_kv_heads": KV,
              "norm_eps": 1e-5, "sliding_window": 4096, "vocab_size": V}
    (d / "params.json").write_text(json.dumps(params))
    shutil.copyfile(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mistral" / "tokenizer.model.v1",
                    d / "tokenizer.model")
    return write_pth(d / "consolidated.00.pth", raw_shapes(layers), torch.bfloat16)


# --------------------------------------------------------------------------- measured runs (fresh processes)

_RUNNER = r"""
import json, resource, sys, time
t = time.perf_counter()
kind, args = sys.argv[1], sys.argv[2:]
if kind == "enc":
    from enc.cli.main import run
    rc = run(args)
else:
    import subprocess
    rc = subprocess.call(args)
wall = time.perf_counter() - t
# VmHWM: this address space's peak RSS (ru_maxrss would carry over the forking parent's across exec)
hwm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc, "wall": wall, "peak_rss_mb": (hwm_kb if kind == "enc" else child_kb) / 1024}))
"""

_PEER = r"""
import json, resource, sys, time
t = time.perf_counter()
import torch
from transformers import MistralConfig, MistralForCausalLM
src, out = sys.argv[1], sys.argv[2]
p = json.load(open(src + "/params.json"))
# transformers' convert_mistral_weights_to_hf.py: load everything, permute q/k, build on meta, save_pretrained
sd = torch.load(src + "/consolidated.00.pth", map_location="cpu", weights_only=True)
H, KV, hd, D = p["n_heads"], p["n_kv_heads"], p["head_dim"], p["dim"]
def permute(w, n):
    return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape[0], w.shape[1])
new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
       "lm_head.weight": sd["output.weight"]}
for i in range(p["n_layers"]):
    r, h = f"layers.{i}.", f"model.layers.{i}."
    new[h + "self_attn.q_proj.weight"] = permute(sd[r + "attention.wq.weight"], H)
    new[h + "self_attn.k_proj.weight"] = permute(sd[r + "attention.wk.weight"], KV)
    new[h + "self_attn.v_proj.weight"] = sd[r + "attention.wv.weight"]
    new[h + "self_attn.o_proj.weight"] = sd[r + "attention.wo.weight"]
    new[h + "mlp.gate_proj.weight"] = sd[r + "feed_forward.w1.weight"]
    new[h + "mlp.down_proj.weight"] = sd[r + "feed_forward.w2.weight"]
    new[h + "mlp.up_proj.weight"] = sd[r + "feed_forward.w3.weight"]
    new[h + "input_layernorm.weight"] = sd[r + "attention_norm.weight"]
    new[h + "post_attention_layernorm.weight"] = sd[r + "ffn_norm.weight"]
cfg = MistralConfig(hidden_size=D, intermediate_size=p["hidden_dim"], num_hidden_layers=p["n_layers"],
                    num_attention_heads=H, num_key_value_heads=KV, head_dim=hd, rms_norm_eps=p["norm_eps"],
                    sliding_window=p.get("sliding_window"), vocab_size=p["vocab_size"], rope_theta=10000.0,
                    max_position_embeddings=32768)
with torch.device("meta"):
    model = MistralForCausalLM(cfg)
model.load_state_dict(new, strict=True, assign=True)
model.save_pretrained(out)
wall = time.perf_counter() - t
hwm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": 0, "wall": wall, "peak_rss_mb": hwm_kb / 1024}))
"""


def measure(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"run failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the default convert (with parity)")
    args = ap.parse_args()
    peer = args.peer if args.peer is not None else args.layers <= 4
    root = Path(tempfile.mkdtemp(prefix="enc-bench-convert-", dir=args.dir))
    try:
        src = root / f"mistral-7b-geometry-{args.layers}L"
        t = time.perf_counter()
        nbytes = write_release(src, args.layers)
        print(f"wrote {src}: {args.layers} layers, {nbytes / 1e9:.2f} GB bf16 tensor data "
              f"({(src / 'consolidated.00.pth').stat().st_size / 1e9:.2f} GB file) in {time.perf_counter() - t:.0f}s")

        cp = measure(_RUNNER, "cmd", "cp", str(src / "consolidated.00.pth"), str(root / "copy.pth"))
        (root / "copy.pth").unlink()
        print(f"cp of the same bytes:            {cp['wall']:7.1f}s  peak RSS {cp['peak_rss_mb']:7.0f} MB")

        out = root / "hf-noverify"
        enc = measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--no-verify", "--json")
        size = du(out)
        shutil.rmtree(out)
        print(f"enc convert --no-verify:          {enc['wall']:7.1f}s  peak RSS {enc['peak_rss_mb']:7.0f} MB  "
              f"(output {size / 1e9:.2f} GB)")
        print(f"  enc / cp wall = {enc['wall'] / cp['wall']:.2f}x; peak RSS = {enc['peak_rss_mb'] / 1024:.2f} GB "
              f"for a {nbytes / 1e9:.1f} GB checkpoint ({100 * enc['peak_rss_mb'] * 2**20 / nbytes:.1f}% of it)")
        if args.verify:
            out = root / "hf"
            full = measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--json")
            shutil.rmtree(out)
            print(f"enc convert (with parity):        {full['wall']:7.1f}s  peak RSS {full['peak_rss_mb']:7.0f} MB")
        if peer:
            out = root / "hf-transformers"
            hf = measure(_PEER, str(src), str(out))
            shutil.rmtree(out)
            print(f"transformers approach (load all): {hf['wall']:7.1f}s  peak RSS {hf['peak_rss_mb']:7.0f} MB")
            print(f"  enc / transformers: wall {enc['wall'] / hf['wall']:.2f}x, "
                  f"peak RSS {enc['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
    os.sync()


if __name__ == "__main__":
    main()
