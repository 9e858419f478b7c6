"""Conversion of a Mistral-7B / Mixtral-geometry raw release: wall time vs cp, peak RSS.

Writes a raw release with Mistral 7B v0.1's geometry (dim 4096, 32 heads, 8 KV heads, FFN 14336,
vocab 32000, bf16) and N layers (default 4, 2.27 GB; ``--layers 32`` is the full 14.5 GB model), or
with ``--experts 8`` Mixtral-8x7B's (default 2 layers, 6.2 GB), as ``consolidated.00.pth`` (or
``--format safetensors``: ``consolidated.safetensors``). The file is written by a streaming writer
(below), so even the 14.5 GB file never sits in this process's memory. Then, alternated, each in a
fresh process, ``--repeat`` times (page cache warm for all of them):

- ``cp`` of the same file (the floor for any conversion that has to write the bytes);
- ``enc convert --no-verify`` (the pure conversion); peak RSS = the process's VmHWM
  (``ru_maxrss`` is not used for Python: it keeps the forking parent's high-water mark across exec);
- with ``--baseline-src DIR`` (e.g. /work/main/src): the same command from another enc source tree,
  for before/after numbers measured in the same run;
- with ``--verify``: the default ``enc convert`` (with parity), once;
- with ``--peer``: transformers' own approach, as in its ``convert_mistral_weights_to_hf.py``:
  ``torch.load`` everything, permute q/k, assign into a ``MistralForCausalLM`` on the meta device
  and ``save_pretrained`` (dense only), once.

Prints per-run times, the median and the spread (min-max), and ``ratio`` lines against the targets
(issue 16: <= 1.5x cp at 4 layers, <= 1.25x at 32, peak RSS <= 0.6 GB). Everything it writes goes
into one temp directory that is removed at the end (disk is shared).

Usage: python benchmarks/bench_mistral_convert.py [--layers 4] [--experts 0|8] [--repeat 3]
       [--format pth|safetensors] [--baseline-src /work/main/src] [--verify] [--peer] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402,F401 - this checkout's src/ for every child, bytecode compiled once

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


_POOL: dict = {}


def _pool(dtype: torch.dtype, g: torch.Generator, shift: int) -> memoryview:
    """64 Mi random values (N(0, 0.02)) as bytes, rotated by ``shift``: fast to write, not all alike."""
    if dtype not in _POOL:
        t = (torch.randn(2 * 32 * 2**20, generator=g) * 0.02).to(dtype).view(torch.uint8).numpy()
        _POOL[dtype] = memoryview(t.tobytes())
    pool = _POOL[dtype]
    k = (shift * 4099 * dtype.itemsize) % (len(pool) // 2)
    return pool[k:k + len(pool) // 2]


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> int:
    """A consolidated.safetensors (v0.3 releases), streamed; returns bytes of tensor data."""
    code = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    head, off = {}, 0
    for name, sh in shapes.items():
        n = int(torch.Size(sh).numel()) * dtype.itemsize
        head[name] = {"dtype": code, "shape": list(sh), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, sh in shapes.items():
            left = int(torch.Size(sh).numel()) * dtype.itemsize
            while left:
                chunk = _pool(dtype, g, left + len(name))[: min(left, 64 * 2**20)]
                f.write(chunk)
                left -= len(chunk)
    return off


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
                    if name.endswith("norm.weight"):
                        yield (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype).view(torch.uint8).numpy().tobytes()
                    else:
                        yield _pool(dtype, g, start + len(name))[: n * dtype.itemsize]

            record(f"data/{keys[name]}", nbytes=numel * dtype.itemsize, chunks=chunks())
            total += numel * dtype.itemsize
        record("version", b"3\n")
        record(".data/serialization_id", b"0" * 40)
    return total


def raw_shapes(layers: int, experts: int = 0) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,),
            p + "attention.wq.weight": (H * HD, D), p + "attention.wk.weight": (KV * HD, D),
            p + "attention.wv.weight": (KV * HD, D), p + "attention.wo.weight": (D, H * HD),
        })
        if experts:
            shapes[p + "feed_forward.gate.weight"] = (experts, D)
            for e in range(experts):
                q = f"{p}feed_forward.experts.{e}."
                shapes.update({q + "w1.weight": (FF, D), q + "w2.weight": (D, FF), q + "w3.weight": (FF, D)})
        else:
            shapes.update({p + "feed_forward.w1.weight": (FF, D), p + "feed_forward.w2.weight": (D, FF),
                           p + "feed_forward.w3.weight": (FF, D)})
    return shapes


def write_release(d: Path, layers: int, experts: int = 0, fmt: str = "pth") -> tuple[Path, int]:
    d.mkdir(parents=True)
    params = {"dim": D, "n_layers": layers, "head_dim": HD, "hidden_dim": FF, "n_heads": H, "n_kv_heads": KV,
              "norm_eps": 1e-5, "vocab_size": V}
    if experts:
        params["moe"] = {"num_experts": experts, "num_experts_per_tok": 2}
        params["rope_theta"] = 1e6
    else:
        params["sliding_window"] = 4096
    (d / "params.json").write_text(json.dumps(params))
    shutil.copyfile(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mistral" / "tokenizer.model.v1",
                    d / "tokenizer.model")
    if fmt == "safetensors":
        f = d / "consolidated.safetensors"
        return f, write_safetensors(f, raw_shapes(layers, experts), torch.bfloat16)
    f = d / "consolidated.00.pth"
    return f, write_pth(f, raw_shapes(layers, experts), torch.bfloat16)


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


def measure(code: str, *args: str, src: Path | None = None) -> dict:
    """Run in a fresh interpreter. ``wall`` for enc includes the interpreter's start (a user pays it);
    for ``cmd`` it is the command alone, timed inside the runner (stricter for enc)."""
    env = {**os.environ, "PYTHONPATH": str(src or ROOT / "src")}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    outer = time.perf_counter() - t
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines or json.loads(lines[-1])["rc"] != 0:
        raise RuntimeError(f"run failed ({r.returncode}): {r.stderr[-2000:]}")
    res = json.loads(lines[-1])
    if args and args[0] != "cmd" or code is not _RUNNER:
        res["wall"] = outer
    return res


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):6.2f}s  min {min(xs):6.2f}s  max {max(xs):6.2f}s  runs " + \
        " ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="default 4 (dense) or 2 (--experts)")
    ap.add_argument("--experts", type=int, default=0, help="8: Mixtral-8x7B geometry")
    ap.add_argument("--format", choices=["pth", "safetensors"], default="pth")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--baseline-src", type=Path, default=None, help="another enc src/ tree to time (before/after)")
    ap.add_argument("--peer", action="store_true", help="also time transformers' load-all conversion (dense)")
    ap.add_argument("--verify", action="store_true", help="also time the default convert (with parity), once")
    args = ap.parse_args()
    layers = args.layers or (2 if args.experts else 4)
    target = 1.5 if layers <= 4 else 1.25
    root = Path(tempfile.mkdtemp(prefix="enc-bench-convert-", dir=args.dir))
    try:
        name = f"{'mixtral' if args.experts else 'mistral'}-geometry-{layers}L"
        src = root / name
        t = time.perf_counter()
        weights, nbytes = write_release(src, layers, args.experts, args.format)
        print(f"wrote {src}: {layers} layers{f', {args.experts} experts' if args.experts else ''}, "
              f"{nbytes / 1e9:.2f} GB bf16 tensor data ({weights.name}, {weights.stat().st_size / 1e9:.2f} GB) "
              f"in {time.perf_counter() - t:.0f}s")
        subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

        runs: dict[str, list[dict]] = {"cp": [], "enc": [], "baseline": []}
        for _ in range(args.repeat):
            # every timed run starts with no dirty pages (os.sync first): otherwise whichever command runs
            # next is throttled by the previous one's write-back, and cp's times spread 1.1-2.9 s
            os.sync()
            runs["cp"].append(measure(_RUNNER, "cmd", "cp", str(weights), str(root / "copy")))
            (root / "copy").unlink()
            os.sync()
            out = root / "hf"
            runs["enc"].append(measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--no-verify", "--json"))
            size = du(out)
            shutil.rmtree(out)
            if args.baseline_src:
                os.sync()
                runs["baseline"].append(measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--no-verify",
                                                "--json", src=args.baseline_src))
                shutil.rmtree(out)
        cp_t = [r["wall"] for r in runs["cp"]]
        enc_t = [r["wall"] for r in runs["enc"]]
        rss = max(r["peak_rss_mb"] for r in runs["enc"]) / 1024
        print(f"cp of the same bytes:      {spread(cp_t)}")
        print(f"enc convert --no-verify:   {spread(enc_t)}  peak RSS {rss:.2f} GB (output {size / 1e9:.2f} GB)")
        ratios = [e / c for e, c in zip(enc_t, cp_t, strict=True)]
        ratio = statistics.median(enc_t) / statistics.median(cp_t)
        print(f"ratio enc/cp = {ratio:.2f}x (median/median; per run {min(ratios):.2f}x-{max(ratios):.2f}x) "
              f"target <= {target}x: {'OK' if ratio <= target else 'MISSED'}")
        print(f"ratio peak RSS = {rss:.2f} GB for {nbytes / 1e9:.1f} GB of weights, target <= 0.6 GB: "
              f"{'OK' if rss <= 0.6 else 'MISSED'}")
        if args.baseline_src:
            base_t = [r["wall"] for r in runs["baseline"]]
            base_rss = max(r["peak_rss_mb"] for r in runs["baseline"]) / 1024
            print(f"baseline ({args.baseline_src}): {spread(base_t)}  peak RSS {base_rss:.2f} GB")
            print(f"ratio baseline/cp = {statistics.median(base_t) / statistics.median(cp_t):.2f}x; "
                  f"ratio enc/baseline = {statistics.median(enc_t) / statistics.median(base_t):.2f}x")
        if args.verify:
            out = root / "hf-verified"
            full = measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--json")
            shutil.rmtree(out)
            print(f"enc convert (with parity): {full['wall']:7.2f}s  peak RSS {full['peak_rss_mb'] / 1024:.2f} GB")
        if args.peer and not args.experts and args.format == "pth":
            out = root / "hf-transformers"
            hf = measure(_PEER, str(src), str(out))
            shutil.rmtree(out)
            print(f"transformers approach (load all): {hf['wall']:7.2f}s  peak RSS {hf['peak_rss_mb'] / 1024:.2f} GB")
            print(f"ratio enc/transformers: wall {statistics.median(enc_t) / hf['wall']:.2f}x, "
                  f"peak RSS {rss * 1024 / hf['peak_rss_mb']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


if __name__ == "__main__":
    main()
