"""enc generate PROMPT --model DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from enc.cli.common import (
    JSON,
    Device,
    DType,
    command,
    dtype_name,
    err,
    finish,
    q,
    resolve_device,
    status,
    write_out,
)

# llama.cpp's defaults, used where neither a flag nor the model's generation_config.json says otherwise.
DEFAULTS = {"temp": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0, "max_new_tokens": 128}
# generation_config.json (transformers' names) -> enc's settings
GEN_CONFIG_KEYS = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repetition_penalty": "repeat_penalty", "max_new_tokens": "max_new_tokens"}


@command("generate")
def generate(
    prompt_arg: str = typer.Argument(None, metavar="PROMPT", help="The prompt ('-' or none: -p, -f or stdin). "
                                                                  "With --chat: the user message."),
    prompt_opt: str = typer.Option(None, "-p", "--prompt", help="The prompt (as llama.cpp's -p)."),
    file: Path = typer.Option(None, "-f", "--file", help="Read the prompt from a file."),
    model: Path = typer.Option(..., "--model", "-m", help="A converted (or any HF-layout) decoder directory."),
    max_new_tokens: int = typer.Option(None, "-n", "--max-new-tokens", "--n-predict", min=0,
                                       help="Tokens to generate (default: generation_config.json, else 128)."),
    temp: float = typer.Option(None, "--temp", "--temperature", help="Temperature; 0 = greedy (default: "
                                                                     "generation_config.json, else 0.8)."),
    top_k: int = typer.Option(None, "-k", "--top-k", help="Top-k sampling, <= 0: off (default: "
                                                          "generation_config.json, else 40)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling in (0, 1], 1: off (default: "
                                                      "generation_config.json, else 0.95)."),
    min_p: float = typer.Option(None, "--min-p", help="Min-p sampling in [0, 1], 0: off (default: "
                                                      "generation_config.json, else 0.05)."),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty", "--repetition-penalty",
                                         help="Penalty for repeated tokens, 1: off (default: generation_config.json, "
                                              "else 1)."),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Tokens the repeat penalty looks back (-1: all)."),
    seed: int = typer.Option(None, "--seed", "-s", help="RNG seed (default: random, reported with --json)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt with the tokenizer's chat template."),
    system: str = typer.Option(None, "--system", help="System message for --chat."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at the end-of-sequence token."),
    threads: int = typer.Option(None, "-t", "--threads", min=1, help="CPU threads for torch (default: torch's)."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Compute dtype (auto: the weights' dtype)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: cuda when available, else cpu."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam search width (encoder-decoder models; "
                                                                "1: no beams)."),
    json_: bool = JSON,
) -> int:
    """Generate text with a decoder (Mistral, Mixtral, GPT-2, MEGA) or an encoder-decoder (BertGeneration),
    streaming tokens to stdout as they arrive.

    Without --chat the prompt is echoed first (as llama.cpp does); --json's "text" holds exactly what the stream
    shows, "generated_text" only the new text. Sampling defaults come from the model's generation_config.json.
    """
    import torch

    from enc.convert import parse_dtype
    from enc.errors import MissingFile, UsageError
    from enc.generation import Settings, render_chat
    from enc.generation import generate as run_generate
    from enc.models import load_model
    from enc.models.loading import read_config
    from enc.tokenization import load_tokenizer

    if not model.is_dir():
        raise MissingFile(model, "model directory not found")
    prompt = _prompt(prompt_arg, prompt_opt, file, json_)
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    cfg = read_config(model)
    from enc.seq2seq import is_seq2seq

    given = {"temp": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p, "repeat_penalty": repeat_penalty,
             "max_new_tokens": max_new_tokens}
    if is_seq2seq(model):  # BertGeneration bert2bert: text in, text out (greedy with --temp 0, or --num-beams N)
        from enc.seq2seq import run_cli

        if chat or system:
            raise UsageError(None, "--chat/--system need a decoder-only model; this one is an encoder-decoder")
        gen_cfg, _ = _generation_config(model, load_tokenizer(model))
        values = {k: v if v is not None else gen_cfg.get(k, DEFAULTS[k]) for k, v in given.items()}
        settings = Settings(max_new_tokens=int(values["max_new_tokens"]), temp=float(values["temp"]),
                            top_k=int(values["top_k"]), top_p=float(values["top_p"]), min_p=float(values["min_p"]),
                            repeat_penalty=float(values["repeat_penalty"]), repeat_last_n=repeat_last_n, seed=seed,
                            ignore_eos=ignore_eos)
        out = run_cli(prompt, model, settings, num_beams, parse_dtype(dtype_name(dtype)), dev, json_, write_out,
                      lambda msg: err.print(f"[dim]{q(msg)}[/dim]"))
        return finish(out)
    if num_beams != 1:
        raise UsageError(None, "--num-beams needs an encoder-decoder model (beam search is not offered for decoders)")
    if not _is_decoder(cfg):
        raise UsageError(model, f"is not a decoder (model_type {cfg.get('model_type')!r}, architectures "
                                f"{cfg.get('architectures')}): generate needs a causal LM; for a masked LM use "
                                "`enc fill-mask`")
    tokenizer = load_tokenizer(model)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = render_chat(tokenizer, messages)
    else:
        if system:
            raise UsageError(None, "--system needs --chat")
        prompt_ids = list(tokenizer.encode(prompt).ids)

    gen_cfg, stop_ids = _generation_config(model, tokenizer)
    values = {k: v if v is not None else gen_cfg.get(k, DEFAULTS[k]) for k, v in given.items()}
    settings = Settings(max_new_tokens=int(values["max_new_tokens"]), temp=float(values["temp"]),
                        top_k=int(values["top_k"]), top_p=float(values["top_p"]), min_p=float(values["min_p"]),
                        repeat_penalty=float(values["repeat_penalty"]), repeat_last_n=repeat_last_n, seed=seed,
                        stop_ids=stop_ids, ignore_eos=ignore_eos)
    settings.validate()
    if any(s == "" for s in stop):
        raise UsageError(None, "--stop needs a non-empty text")
    with status(f"loading {model}"):
        net = load_model(model, dtype=parse_dtype(dtype_name(dtype)), device=dev)

    echo = "" if chat else prompt
    streaming = not json_
    if streaming and echo:
        write_out(echo)
    cut = StopText(stop, write_out if streaming else (lambda t: None))
    result = run_generate(net, tokenizer, prompt_ids, settings, on_token=lambda _tok, text: cut.push(text))
    cut.close()
    if streaming:
        write_out("\n")
        err.print(f"[dim]prompt {result.prompt_tokens} tokens, {result.prefill_tokens_per_s:.1f} tok/s | "
                  f"generated {result.generated_tokens} tokens, {result.decode_tokens_per_s:.2f} tok/s | "
                  f"stop: {q(result.stop_reason)} | seed {result.seed}[/dim]")
    out = result.to_dict()
    out.update({"model": str(model), "chat": chat, "prompt": prompt, "text": echo + cut.text,
                "generated_text": cut.text, "stop_strings": list(stop), "settings_from": {
                    k: "flag" if given[k] is not None else "generation_config.json" if k in gen_cfg else "default"
                    for k in given}})
    return finish(out)


def _prompt(arg: str | None, opt: str | None, file: Path | None, json_: bool) -> str:
    from enc.errors import MissingFile, UsageError

    given = [x for x in (arg if arg != "-" else None, opt, file) if x is not None]
    if len(given) > 1:
        raise UsageError(None, "give the prompt once: PROMPT, -p/--prompt or -f/--file")
    if opt is not None:
        return opt
    if arg is not None and arg != "-":
        return arg
    if file is not None:
        if not file.is_file():
            raise MissingFile(file, "prompt file not found")
        return _text(file.read_bytes(), str(file))
    if sys.stdin.isatty() and not json_:
        err.print("reading the prompt from stdin (end with Ctrl-D)")
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    text = _text(data, "stdin")
    return text[:-1] if text.endswith("\n") else text  # the newline that ends the input line is not the prompt's


def _text(data: bytes, where: str) -> str:
    from enc.errors import UsageError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(None, f"{where}: the prompt is not UTF-8 (byte {e.start + 1})") from None


def _is_decoder(cfg: dict) -> bool:
    arch = " ".join(cfg.get("architectures") or [])
    return cfg.get("model_type") in ("gpt2", "mistral", "mixtral") or "CausalLM" in arch or "LMHead" in arch


def _generation_config(model: Path, tokenizer) -> tuple[dict, list[int] | None]:
    """Sampling defaults from generation_config.json (do_sample false: greedy) and its EOS ids."""
    import json

    path = model / "generation_config.json"
    if not path.is_file():
        return {}, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        from enc.errors import ConfigError

        raise ConfigError(path, "not valid JSON") from None
    if not isinstance(raw, dict):
        return {}, None
    values = {ours: raw[theirs] for theirs, ours in GEN_CONFIG_KEYS.items()
              if isinstance(raw.get(theirs), (int, float)) and not isinstance(raw.get(theirs), bool)}
    if raw.get("do_sample") is False:
        values["temp"] = 0.0  # transformers: greedy unless sampling is asked for
    eos = raw.get("eos_token_id")
    stop_ids = None
    if isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(i, int) for i in eos)):
        stop_ids = sorted(set([eos] if isinstance(eos, int) else eos)
                          | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
    return values, stop_ids


class StopText:
    """Streams text through ``emit`` but holds back what could begin a stop string; ``push`` is true at a stop."""

    def __init__(self, stops: list[str], emit):
        self.stops, self.emit = [s for s in stops if s], emit
        self.text = ""  # everything emitted
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> bool:
        if self.stopped or not piece:
            return self.stopped
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._out(self.pending[:min(hits)])
            self.pending, self.stopped = "", True
            return True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        self._out(self.pending[:len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]
        return False

    def close(self) -> None:
        if not self.stopped:
            self._out(self.pending)
        self.pending = ""

    def _out(self, t: str) -> None:
        if t:
            self.text += t
            self.emit(t)
