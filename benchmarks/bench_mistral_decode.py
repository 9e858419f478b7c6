"""Decode speed of enc's Mistral runtime vs transformers generate(), and vs the machine's bandwidth limit.

A Mistral-7B-width model (hidden 4096, 32 heads, 8 KV heads, FFN 14336, vocab 32000) with 2
layers is written once as an HF directory (random weights). For float32 and bfloat16, in the
same run:

- enc: ``enc.generation.generate`` greedy, N new tokens, decode tokens/s from its timer;
- transformers: ``MistralForCausalLM.from_pretrained(dir).generate(do_sample=False)``, decode
  tokens/s = (N - 1) / (time(N tokens) - time(1 token));
- the limit: batch-1 decode reads every weight matrix once per token, so tokens/s can be at most
  (measured matrix-vector bandwidth) / (bytes of weights read per token). The bandwidth is
  measured here, as the best of plain ``F.linear`` and oneDNN's blocked matrix-vector kernel on
  14336 x 4096 matrices of the same dtype, cycling through >= 1 GiB of distinct matrices so every
  byte comes from DRAM as in decode (the fastest of several passes, before and after each round);
  the streaming rate of a 1 GiB ``sum`` is printed for reference. ``F.linear`` and enc's kernel are
  measured on matrices in ordinary 4 KiB pages and again on 2 MiB huge pages (where enc's fp32 decode
  weights live, enc.models.hugepages); the limit is the best of all.

For float32 the bandwidth also includes enc's own decode kernel (``enc.models.rowsplit``: row blocks
over two threads). Both sides are timed the same way, (N - 1) / (t(N) - t(1)), in one process, their
order alternating between rounds, with the process CPU-seconds per token (a busy machine shows there).

Prints every number and the ratios: enc / transformers (target >= 1.4x in every round, issue 16:
the median, min and max over rounds are printed, not only the best), enc / limit (80%), and per
round the limit / transformers: the highest ratio any decoder could have printed in that round.
``--before`` also times enc's previous decode path (oneDNN-packed fp32, torch's threads) in the same
rounds; ``--peer-threads 1`` also times transformers at one thread (printed, not in the ratio).
Usage: python benchmarks/bench_mistral_decode.py [--tokens 64] [--layers 2] [--reps 3] [--threads N] [--keep DIR]
       [--dtypes float32,bfloat16] [--before] [--peer-threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _util  # noqa: F401 - puts this checkout's src/ first on sys.path
import torch
import torch.nn.functional as F

D, H, KV, HD, FF, V = 4096, 32, 8, 128, 14336, 32000
NOT_KERNELS = ("stream_sum", "stream_sum_hugepages", "load")


def write_model(d: Path, layers: int) -> None:
    """Random HF-layout Mistral weights, streamed one tensor at a time (float32)."""
    from enc.io.lazy import LazyTensor
    from enc.io.safetensors_out import write_sharded

    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * HD, D), p + "self_attn.k_proj.weight": (KV * HD, D),
            p + "self_attn.v_proj.weight": (KV * HD, D), p + "self_attn.o_proj.weight": (D, H * HD),
            p + "mlp.gate_proj.weight": (FF, D), p + "mlp.up_proj.weight": (FF, D), p + "mlp.down_proj.weight": (D, FF),
        })

    def make(name: str, shape: tuple[int, ...], seed: int):
        def load() -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            if name.endswith("norm.weight"):
                return 1.0 + 0.1 * torch.randn(shape, generator=g)
            return torch.randn(shape, generator=g) * (0.5 / shape[-1] ** 0.5 if len(shape) == 2 else 1.0)

        return LazyTensor(shape, torch.float32, load, (name,))

    tensors = {k: make(k, s, i) for i, (k, s) in enumerate(shapes.items())}
    write_sharded(d, tensors, "2GB")
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": V, "hidden_size": D,
           "intermediate_size": FF, "num_hidden_layers": layers, "num_attention_heads": H, "num_key_value_heads": KV,
           "head_dim": HD, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def spread(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}; runs "
            + " ".join(f"{x:.2f}" for x in xs) + ")")


def weight_bytes_per_token(layers: int, itemsize: int) -> int:
    per_layer = (H * HD * D) + 2 * (KV * HD * D) + (D * H * HD) + 3 * FF * D + 2 * D
    return (layers * per_layer + V * D + D) * itemsize  # + lm_head + final norm (the embedding row is negligible)


def matvec_bandwidth(dtype: torch.dtype, reps: int = 4) -> dict:
    """GB/s of batch-1 matrix-vector products over 14336 x 4096 matrices, cycling through >= 1 GiB of them.

    Cycling through distinct matrices (several times the last-level cache) measures what decode
    sees: every weight read from DRAM once per token. (Repeating one 117-235 MB matrix lets part
    of it stay cached and overstates the rate.)
    """
    one = FF * D * dtype.itemsize
    n = max(2, -(-(2**30) // one))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(FF, D, generator=g).to(dtype) for _ in range(n)]
    x = torch.randn(1, D).to(dtype)
    kernels = {"F.linear": [lambda w=w: F.linear(x, w) for w in ws]}
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
        kernels["onednn_packed"] = [
            lambda p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    # the same matrices on 2 MiB huge pages (enc.models.hugepages: enc's fp32 decode weights live there);
    # any decoder could place its weights so, so the limit takes the best of both layouts
    from enc.models import hugepages

    hws = [hugepages.copy(w) for w in ws]
    kernels["F.linear_hugepages"] = [lambda w=w: F.linear(x, w) for w in hws]
    if dtype == torch.float32:  # enc's fp32 decode kernel: row blocks over two threads (enc.models.rowsplit)
        from enc.models import rowsplit

        kernels["rowsplit"] = [lambda w=w: rowsplit.matvec(w, x[0]) for w in ws]
        kernels["rowsplit_hugepages"] = [lambda w=w: rowsplit.matvec(w, x[0]) for w in hws]
    out = {}
    for name, fns in kernels.items():
        with rowsplit_ctx(name.removesuffix("_hugepages")):
            for fn in fns:
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                for fn in fns:
                    fn()
                times.append(time.perf_counter() - t)
        out[name] = n * one / min(times) / 1e9
    del ws, hws, kernels
    for key, big in (("stream_sum", torch.ones(256 * 2**20)),  # 1 GiB
                     ("stream_sum_hugepages", hugepages.copy(torch.ones(256 * 2**20)))):
        big.sum()
        t = time.perf_counter()
        for _ in range(5):
            big.sum()
        out[key] = 5 * big.numel() * 4 / (time.perf_counter() - t) / 1e9
        del big
    out["load"] = os.getloadavg()[0]
    return out


def rowsplit_ctx(name: str):
    import contextlib

    if name != "rowsplit":
        return contextlib.nullcontext()
    from enc.models import rowsplit

    return rowsplit.decode_threads()


class EncRunner:
    def __init__(self, d: Path, dtype: torch.dtype, n: int, prompt: list[int], before: bool = False):
        import contextlib

        from enc.generation import Settings, generate
        from enc.models.mistral import _onednn_works, from_pretrained

        if before:  # enc before issue 16's decode work: every dtype oneDNN-packed, torch's threads, no row split
            self.model = from_pretrained(d, dtype=dtype, prepare=False).prepare_inference(onednn=_onednn_works(dtype))
            self.model.decode_threads = lambda: contextlib.nullcontext(False)
        else:
            self.model = from_pretrained(d, dtype=dtype)
        self.generate, self.prompt, self.n = generate, prompt, n
        generate(self.model, None, prompt, Settings(max_new_tokens=4, temp=0, stop_ids=[]))  # warm-up

    def _run(self, k: int) -> tuple[float, list[int]]:
        from enc.generation import Settings

        t = time.perf_counter()
        r = self.generate(self.model, None, self.prompt, Settings(max_new_tokens=k, temp=0, stop_ids=[]))
        return time.perf_counter() - t, r.token_ids

    def __call__(self) -> tuple[float, float, list[int]]:
        """Decode tokens/s timed as for transformers: (N - 1) / (time(N tokens) - time(1 token)); CPU s/token."""
        c = time.process_time()
        t1, _ = self._run(1)
        tn, toks = self._run(self.n)
        return (self.n - 1) / (tn - t1), (time.process_time() - c) / (self.n + 1), toks


class HFRunner:
    def __init__(self, d: Path, dtype: torch.dtype, n: int, prompt: list[int]):
        from transformers import MistralForCausalLM

        self.model = MistralForCausalLM.from_pretrained(d, dtype=dtype).eval()
        self.ids, self.n = torch.tensor([prompt]), n
        self._run(4)  # warm-up

    def _run(self, k: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[0, self.ids.shape[1]:].tolist()

    def __call__(self, threads: int | None = None) -> tuple[float, float, list[int]]:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            c = time.process_time()
            t1, _ = self._run(1)
            tn, toks = self._run(self.n)
        finally:
            torch.set_num_threads(before)
        return (self.n - 1) / (tn - t1), (time.process_time() - c) / (self.n + 1), toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="reuse / keep the model directory here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--before", action="store_true",
                    help="also time enc as it decoded before issue 16's decode work, in the same rounds")
    ap.add_argument("--peer-threads", type=int, default=0,
                    help="also time transformers at this many threads each round (printed, not in the ratio)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (a busy machine is the first source of spread)")
    tmp = None
    d = args.keep
    if d is None:
        tmp = Path(tempfile.mkdtemp(prefix="enc-bench-decode-"))
        d = tmp / "model"
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_model(d, args.layers)
        print(f"wrote {d} ({args.layers} layers, Mistral-7B width) in {time.perf_counter() - t:.1f}s")
    prompt = [1] + torch.randint(3, V, (15,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        for dtype in [getattr(torch, n) for n in args.dtypes.split(",")]:
            name = str(dtype).replace("torch.", "")
            nbytes = weight_bytes_per_token(args.layers, dtype.itemsize)
            ours_run = EncRunner(d, dtype, args.tokens, prompt)
            theirs_run = HFRunner(d, dtype, args.tokens, prompt)
            before_run = EncRunner(d, dtype, args.tokens, prompt, before=True) if args.before else None
            rows = []
            # interleaved rounds, the order of the two sides alternating: the machine is shared, so every
            # ratio compares numbers taken side by side, and neither side always runs first
            for r in range(args.reps):
                bw = matvec_bandwidth(dtype)
                best_bw = max(v for k, v in bw.items() if k not in NOT_KERNELS)
                extra = None
                if r % 2 == 0:
                    ours, ours_cpu, our_ids = ours_run()
                    theirs, theirs_cpu, their_ids = theirs_run()
                    if args.peer_threads:
                        extra = theirs_run(args.peer_threads)
                else:
                    if args.peer_threads:
                        extra = theirs_run(args.peer_threads)
                    theirs, theirs_cpu, their_ids = theirs_run()
                    ours, ours_cpu, our_ids = ours_run()
                old = before_run() if before_run is not None else None
                bw2 = matvec_bandwidth(dtype)
                best_bw = max(best_bw, *(v for k, v in bw2.items() if k not in NOT_KERNELS))
                rows.append((bw, best_bw, best_bw * 1e9 / nbytes, ours, theirs, ours_cpu, theirs_cpu, extra, old))
            del ours_run, theirs_run, before_run
            gc.collect()
            same = sum(a == b for a, b in zip(our_ids, their_ids, strict=False))
            print(f"\n[{name}] weights read per token: {nbytes / 1e9:.3f} GB; {args.tokens} new tokens, "
                  f"{args.reps} interleaved rounds; both sides timed as (N - 1) / (t(N tokens) - t(1 token))")
            for r, (bw, _best, limit, ours, theirs, ours_cpu, theirs_cpu, extra, old) in enumerate(rows):
                kern = ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k not in NOT_KERNELS)
                print(f"[{name}] round {r} (load {bw['load']:.1f}): matvec GB/s {kern}; 1 GiB sum {bw['stream_sum']:.1f} "
                      f"({bw['stream_sum_hugepages']:.1f} on huge pages) | "
                      f"limit {limit:.2f} tok/s | enc {ours:.2f} tok/s ({ours_cpu:.3f} CPU-s/token) | transformers "
                      f"{theirs:.2f} tok/s ({theirs_cpu:.3f} CPU-s/token) | enc/transformers {ours / theirs:.2f}x | "
                      f"ceiling limit/transformers {limit / theirs:.2f}x | enc/limit {100 * ours / limit:.0f}%"
                      + (f" | transformers at {args.peer_threads} thread(s): {extra[0]:.2f} tok/s "
                         f"({extra[1]:.3f} CPU-s/token)" if extra else "")
                      + (f" | enc before (oneDNN-packed, torch's threads): {old[0]:.2f} tok/s ({old[1]:.3f} CPU-s/token) "
                         f"= {old[0] / theirs:.2f}x" if old else ""))
            med = statistics.median
            print(f"[{name}] median: enc {med(r[3] for r in rows):.2f} tok/s, transformers "
                  f"{med(r[4] for r in rows):.2f} tok/s, limit {med(r[2] for r in rows):.2f} tok/s")
            ratios = [r[3] / r[4] for r in rows]
            enc_tps = [r[3] for r in rows]
            print(f"[{name}] enc tok/s over rounds: {spread(enc_tps)}; transformers: {spread([r[4] for r in rows])}")
            print(f"[{name}] CPU-s/token: enc {spread([r[5] for r in rows])}; transformers {spread([r[6] for r in rows])}")
            print(f"[{name}] ratio enc/transformers = {med(ratios):.2f}x median, min {min(ratios):.2f}x, max "
                  f"{max(ratios):.2f}x over {len(rows)} rounds (target >= 1.4x in every round: "
                  f"{'OK' if min(ratios) >= 1.4 else 'MISSED'})")
            print(f"[{name}] highest ratio any decoder could print (the limit / transformers, per round): "
                  f"{spread([r[2] / r[4] for r in rows])}")
            print(f"[{name}] enc / bandwidth limit = {100 * med(r[3] / r[2] for r in rows):.0f}% (target >= 80%)")
            if args.before:
                olds = [r[8][0] / r[4] for r in rows]
                print(f"[{name}] enc before / transformers: {spread(olds)}")
            print(f"[{name}] greedy tokens identical to transformers: {same}/{len(our_ids)}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
