"""enc generate PROMPT --model DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from enc.cli.common import emit_json, err


def generate(
    prompt: str = typer.Argument(None, help="The prompt ('-' or none reads stdin). With --chat: the user message."),
    model: Path = typer.Option(..., "--model", "-m", help="A converted (or any HF-layout) decoder directory."),
    max_new_tokens: int = typer.Option(128, "-n", "--max-new-tokens", "--n-predict", help="Tokens to generate."),
    temp: float = typer.Option(0.8, "--temp", help="Temperature; 0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="Top-k sampling (<= 0: off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling (1.0: off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Min-p sampling (0: off)."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for repeated tokens (1.0: off)."),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Tokens the repeat penalty looks back (-1: all)."),
    seed: int = typer.Option(None, "--seed", "-s", help="RNG seed (default: random, reported with --json)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt with the tokenizer's chat template."),
    system: str = typer.Option(None, "--system", help="System message for --chat."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at the end-of-sequence token."),
    dtype: str = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the weights' dtype)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout (no streaming)."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search width (encoder-decoder models; 1: no beams)."),
) -> int:
    """Generate text with a decoder (Mistral, Mixtral, GPT-2), streaming tokens as they arrive."""
    import json

    import torch

    from enc.convert import parse_dtype
    from enc.errors import MissingFile, UsageError
    from enc.generation import Settings, render_chat
    from enc.generation import generate as run_generate
    from enc.models import load_model
    from enc.tokenization import load_tokenizer

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(None, f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(None, "--device cuda: no CUDA device is available to torch")
    if not model.is_dir():
        raise MissingFile(model, "model directory not found")
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    from enc.seq2seq import is_seq2seq, run_cli

    if is_seq2seq(model):  # BertGeneration bert2bert: text in, text out (greedy with --temp 0, or --num-beams N)
        if chat or system:
            raise UsageError(None, "--chat/--system need a decoder-only model; this one is an encoder-decoder")
        s = Settings(max_new_tokens=max_new_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                     repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed, ignore_eos=ignore_eos)
        return run_cli(prompt, model, s, num_beams, parse_dtype(dtype), device, json_, emit_json,
                       lambda t: (sys.stdout.write(t), sys.stdout.flush()), err.print)
    if num_beams != 1:
        raise UsageError(None, "--num-beams needs an encoder-decoder model (beam search is not offered for decoders)")
    tokenizer = load_tokenizer(model)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = render_chat(tokenizer, messages)
    else:
        if system:
            raise UsageError(None, "--system needs --chat")
        prompt_ids = list(tokenizer.encode(prompt).ids)

    stop_ids = None
    gen_cfg = model / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            eos = None
        if eos is not None:
            stop_ids = sorted(set([eos] if isinstance(eos, int) else list(eos))
                              | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
    settings = Settings(max_new_tokens=max_new_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                        repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed, stop_ids=stop_ids,
                        ignore_eos=ignore_eos)
    settings.validate()
    net = load_model(model, dtype=parse_dtype(dtype), device=device)

    if json_:
        result = run_generate(net, tokenizer, prompt_ids, settings)
        emit_json(result.to_dict() | {"model": str(model), "chat": chat})
        return 0

    if not chat:
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def on_token(_tok: int, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    result = run_generate(net, tokenizer, prompt_ids, settings, on_token=on_token)
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(f"[dim]prompt {result.prompt_tokens} tokens, {result.prefill_tokens_per_s:.1f} tok/s | "
              f"generated {result.generated_tokens} tokens, {result.decode_tokens_per_s:.2f} tok/s | "
              f"stop: {result.stop_reason} | seed {result.seed}[/dim]")
    return 0
