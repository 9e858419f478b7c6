"""Golden parity records and ``enc verify``: parity checks in CI without the original checkpoint.

``enc convert`` runs the REFERENCE forward pass (the original layout) during its parity stage. A
:class:`Recorder` taps that stream and keeps, for every checked activation, a compact fingerprint:

- the real (unmasked) positions of the activation, each ``features``-wide row multiplied by a fixed
  random projection to :data:`DIMS` dimensions (rows that are already at most :data:`DIMS` wide are
  stored as they are);
- for logits, also the reference top-:data:`TOPK` indices and values per position.

The probes themselves (token ids, attention mask, segment ids) are stored too, so ``enc verify``
does not depend on how probes are generated. Everything goes into ``OUT/enc_parity.safetensors``
(a few hundred KB for a 7B model), with the recipe and the per-dtype thresholds in its metadata.

``enc verify OUT`` re-runs the converted model (enc's runtime, or transformers' own classes with
``--runtime transformers``) on the stored probes, projects its activations the same way, and judges
them with :func:`enc.parity.measure` and the recorded thresholds for the weights' dtype. It also
checks every file listed in ``enc_provenance.json`` (sha256 and size).

The projection is a Rademacher matrix (entries +-1/sqrt(DIMS)) whose signs come from a 32-bit integer
hash (``lowbias32``) of the entry index: it is the same on every machine and every torch/numpy
version, and never stored. A random projection keeps squared norms and cosines of position vectors
in expectation (Johnson-Lindenstrauss), so NMSE and cosine on fingerprints estimate the full ones;
max-abs is measured on the projected coordinates.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from enc.converters.base import Activation, Probe
from enc.errors import ConfigError, CorruptCheckpoint, EncError, MissingFile

RECORD_FILE = "enc_parity.safetensors"
RECORD_VERSION = 1
RECIPE = "rademacher-lowbias32"
DIMS = 64
TOPK = 10
SEED = 0x656E63  # "enc"
PROVENANCE_FILE = "enc_provenance.json"
RUNTIMES = ("enc", "transformers")


class MissingDependency(EncError):
    """An optional dependency a flag asked for is not installed."""

    kind = "dependency"


# --------------------------------------------------------------------------- the projection


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32 integer hash on uint32 (wrapping multiplies)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


_PROJ: dict[tuple[int, int, int], torch.Tensor] = {}


def projection(features: int, dims: int = DIMS, seed: int = SEED) -> torch.Tensor | None:
    """The fixed [features, dims] float64 projection, or None when rows are stored as they are."""
    if features <= dims:
        return None
    key = (features, dims, seed)
    if key not in _PROJ:
        if features * dims >= 2**32:
            raise ConfigError(None, f"activation too wide to fingerprint ({features} features)")
        salt = _lowbias32(np.array([(seed ^ (features * 0x9E3779B1)) & 0xFFFFFFFF], dtype=np.uint32))[0]
        idx = np.arange(features * dims, dtype=np.uint32)
        bits = (_lowbias32(idx ^ salt) & np.uint32(1)).astype(np.float64)
        r = (1.0 - 2.0 * bits).reshape(features, dims) / np.sqrt(dims)
        if len(_PROJ) > 8:
            _PROJ.clear()
        _PROJ[key] = torch.from_numpy(r)
    return _PROJ[key]


def _positions(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[positions, features] in float64, real positions only (as enc.parity compares them)."""
    t = t.detach().to("cpu", torch.float64)
    if mask is not None:
        t = t[mask.to("cpu").bool()]
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def fingerprint(rows: torch.Tensor, dims: int = DIMS, seed: int = SEED) -> torch.Tensor:
    p = projection(rows.shape[1], dims, seed)
    return rows if p is None else rows @ p


# --------------------------------------------------------------------------- the record


@dataclass
class Entry:
    name: str
    kind: str
    probe: int
    features: int
    positions: int
    masked: bool


@dataclass
class Record:
    meta: dict
    probes: list[Probe]
    entries: list[Entry]
    tensors: dict[str, torch.Tensor]


class Recorder:
    """Wraps a converter for :func:`enc.parity.run_parity`: passes everything through and keeps the
    probes and a fingerprint of every reference activation."""

    def __init__(self, converter, dims: int = DIMS, topk: int = TOPK, seed: int = SEED):
        self._conv = converter
        self.dims, self.topk, self.seed = dims, topk, seed
        self.probe_list: list[Probe] = []
        self.entries: list[Entry] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str):
        return getattr(self._conv, name)

    def probes(self) -> list[Probe]:
        self.probe_list = list(self._conv.probes())
        return self.probe_list

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        seen: dict[str, int] = {}
        for act in self._conv.reference_activations(probes):
            p = seen.get(act.name, 0)
            seen[act.name] = p + 1
            self.add(act, p)
            yield act

    def add(self, act: Activation, probe: int) -> None:
        rows = _positions(act.tensor, act.mask)
        i = len(self.entries)
        self.entries.append(Entry(act.name, act.kind, probe, rows.shape[1], rows.shape[0], act.mask is not None))
        self.tensors[f"act.{i:04d}.proj"] = fingerprint(rows, self.dims, self.seed).float().contiguous()
        if act.mask is not None:
            self.tensors[f"act.{i:04d}.mask"] = act.mask.to("cpu").bool().clone()
        if act.kind == "logits" and rows.shape[1] > 1:
            k = min(self.topk, rows.shape[1])
            top = rows.topk(k, dim=1)
            self.tensors[f"act.{i:04d}.topk_idx"] = top.indices.to(torch.int64).contiguous()
            self.tensors[f"act.{i:04d}.topk_val"] = top.values.float().contiguous()

    def write(self, out_dir: Path, *, fmt: str, dtype: str, parity: dict | None) -> Path:
        """Write ``out_dir/enc_parity.safetensors``."""
        from safetensors.torch import save

        from enc import __version__
        from enc.parity import THRESHOLDS

        tensors = dict(self.tensors)
        probe_meta = []
        for p, probe in enumerate(self.probe_list):
            tensors[f"probe.{p}.input_ids"] = probe.input_ids.to("cpu", torch.int64).contiguous()
            tensors[f"probe.{p}.attention_mask"] = probe.attention_mask.to("cpu", torch.int64).contiguous()
            if probe.token_type_ids is not None:
                tensors[f"probe.{p}.token_type_ids"] = probe.token_type_ids.to("cpu", torch.int64).contiguous()
            extra = _extra_probe_fields(probe)  # e.g. LUKE's entity inputs, a seq2seq probe's decoder ids
            for name, t in extra.items():
                tensors[f"probe.{p}.{name}"] = t.to("cpu").contiguous()
            m = {"name": probe.name, "shape": list(probe.input_ids.shape)}
            if type(probe) is not Probe:
                m["class"] = f"{type(probe).__module__}:{type(probe).__qualname__}"
                m["fields"] = sorted(extra)
            probe_meta.append(m)
        context = getattr(self._conv, "verify_context", None)
        meta = {
            "version": RECORD_VERSION,
            "tokenizer": tokenizer_probe(out_dir),
            "recipe": {"projection": RECIPE, "dims": self.dims, "seed": self.seed, "topk": self.topk,
                       "positions": "real (attention-mask) positions only; reference in float32"},
            "thresholds": {str(k).replace("torch.", ""): vars(v) for k, v in THRESHOLDS.items()},
            "format": fmt,
            "dtype": dtype,
            "enc_version": __version__,
            "parity": None if parity is None else {k: parity.get(k) for k in ("verdict", "dtype", "worst")},
            "probes": probe_meta,
            # what the format's output_activations needs besides the directory (see enc.converters.base)
            "context": context() if callable(context) else {},
            "activations": [vars(e) for e in self.entries],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = Path(out_dir) / RECORD_FILE
        path.write_bytes(save(tensors, metadata={"enc_record": json.dumps(meta)}))  # small: a few hundred KB
        return path


_BASE_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "name")


def _extra_probe_fields(probe: Probe) -> dict[str, torch.Tensor]:
    """The tensor fields a Probe subclass adds (entity ids, decoder ids ...), by name."""
    out = {}
    for f in dataclasses.fields(probe):
        v = getattr(probe, f.name)
        if f.name not in _BASE_FIELDS and isinstance(v, torch.Tensor):
            out[f.name] = v
    return out


def _probe_class(spec: str):
    """A recorded probe class: only a Probe dataclass defined inside enc is ever imported."""
    import importlib

    mod, _, name = spec.partition(":")
    if not (mod == "enc" or mod.startswith("enc.")) or not name.isidentifier():
        raise ValueError(f"probe class {spec!r} is not one of enc's")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        raise ValueError(f"probe class {spec!r} does not exist in this enc") from None
    if not (isinstance(cls, type) and issubclass(cls, Probe) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{spec!r} is not a probe class")
    return cls


TOKENIZER_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France; 1234 naïve café!"


def tokenizer_probe(out_dir: Path) -> dict | None:
    """The token ids enc's tokenizer of ``out_dir`` gives for a fixed text (None: no usable tokenizer)."""
    from enc.tokenization import load_tokenizer

    try:
        tok = load_tokenizer(out_dir)
        ids = [int(i) for i in tok.encode(TOKENIZER_TEXT).ids]
    except Exception:  # noqa: BLE001 - e.g. a conversion without tokenizer files: nothing to record
        return None
    return {"text": TOKENIZER_TEXT, "ids": ids, "class": type(tok).__name__}


def check_tokenizer(out_dir: Path, recorded: dict) -> str | None:
    """None if the directory's tokenizer still gives the recorded ids, else why not."""
    from enc.tokenization import load_tokenizer

    try:
        ids = [int(i) for i in load_tokenizer(out_dir).encode(recorded["text"]).ids]
    except EncError as e:
        return f"tokenizer: {e.one_line()}"
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer file raises whatever its library raises
        return f"tokenizer: cannot be loaded: {type(e).__name__}: {str(e).strip()[:200]}"
    if ids != recorded["ids"]:
        n = next((i for i, (a, b) in enumerate(zip(ids, recorded["ids"])) if a != b), min(len(ids), len(recorded["ids"])))
        return f"tokenizer: gives different ids for the recorded text (first difference at token {n})"
    return None


def read_record(out_dir: Path) -> Record:
    """Load and check ``out_dir/enc_parity.safetensors`` (exit 2 on anything wrong with it)."""
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file():
        why = "no golden record"
        prov = Path(out_dir) / PROVENANCE_FILE
        try:
            if prov.is_file() and json.loads(prov.read_text()).get("parity") is None:
                why += " (the model was converted with --no-verify, so no reference ran)"
        except (json.JSONDecodeError, AttributeError, OSError):
            pass
        raise MissingFile(path, why + "; re-convert with parity on, or use --hash-only")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("enc_record")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise CorruptCheckpoint(path, f"unreadable golden record: {str(e).strip().splitlines()[0]}") from None
    if raw is None:
        raise CorruptCheckpoint(path, "not an enc golden record (no enc_record metadata)")
    try:
        meta = json.loads(raw)
        version = int(meta["version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(path, f"invalid enc_record metadata: {e}") from None
    if version > RECORD_VERSION:
        raise ConfigError(path, f"record version {version} is newer than this enc understands ({RECORD_VERSION}); "
                                "upgrade enc")
    recipe = meta.get("recipe", {})
    if recipe.get("projection") != RECIPE:
        raise ConfigError(path, f"unknown fingerprint recipe {recipe.get('projection')!r}")
    try:
        entries = [Entry(**e) for e in meta["activations"]]
        probes = []
        for p in range(len(meta["probes"])):
            pm = meta["probes"][p]
            tt = tensors.get(f"probe.{p}.token_type_ids")
            cls = _probe_class(pm["class"]) if pm.get("class") else Probe
            known = {f.name for f in dataclasses.fields(cls)}
            extra = {}
            for name in pm.get("fields", []):
                if name not in known or name in _BASE_FIELDS:
                    raise ValueError(f"probe {p} field {name!r} is not a field of {cls.__name__}")
                extra[name] = tensors[f"probe.{p}.{name}"]
            probes.append(cls(tensors[f"probe.{p}.input_ids"], tensors[f"probe.{p}.attention_mask"], tt,
                              name=pm.get("name", ""), **extra))
        if not isinstance(meta.get("context", {}), dict):
            raise ValueError("context is not an object")
        for i, e in enumerate(entries):
            proj = tensors[f"act.{i:04d}.proj"]
            want = (e.positions, min(e.features, int(recipe["dims"])))
            if tuple(proj.shape) != want:
                raise ValueError(f"fingerprint {i} ({e.name}) has shape {tuple(proj.shape)}, expected {want}")
            if not 0 <= e.probe < len(probes):
                raise ValueError(f"fingerprint {i} ({e.name}) names probe {e.probe}")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(path, f"inconsistent golden record: {e}") from None
    return Record(meta, probes, entries, tensors)


# --------------------------------------------------------------------------- runtimes


def _on(probe: Probe, device) -> Probe:
    """The probe (of whatever Probe subclass) with every tensor on ``device``."""
    moved = {f.name: getattr(probe, f.name).to(device) for f in dataclasses.fields(probe)
             if isinstance(getattr(probe, f.name), torch.Tensor)}
    return dataclasses.replace(probe, **moved)


def format_runtime(meta: dict | None, runtime: str):
    """The recorded format's own runtime hook (``output_activations`` for enc's runtime,
    ``transformers_activations`` for transformers), or None when the format has none (model_type decides)."""
    if not meta or not meta.get("format"):
        return None
    from enc.converters import REGISTRY, converter_class

    if meta["format"] not in REGISTRY:
        return None
    cls = converter_class(meta["format"])
    return getattr(cls, "output_activations" if runtime == "enc" else "transformers_activations", None)


def enc_activations(out_dir: Path, probes: Sequence[Probe], device: str = "cpu",
                    meta: dict | None = None) -> Iterator[Activation]:
    """enc's runtime on ``out_dir``: the activations the converter's parity stage yields.

    A format whose converter has an ``output_activations`` classmethod (its parity stage uses the same
    function) runs that, with the record's context; the older families go by model_type."""
    from enc.models.loading import read_config

    hook = format_runtime(meta, "enc")
    if hook is not None:
        yield from hook(Path(out_dir), [_on(p, device) for p in probes], meta.get("context") or {}, device)
        return
    mt = read_config(out_dir).get("model_type")
    if mt == "albert":
        from enc.converters.albert_tf import hf_albert_activations
        from enc.models.albert import from_pretrained

        model = from_pretrained(out_dir, device=device)
        for probe in probes:
            yield from hf_albert_activations(model, _on(probe, device))
    elif mt in ("megatron-bert", "bert", "gpt2"):
        from enc.converters.megatron.converter import MegatronConverter
        from enc.models import load_model

        model = load_model(out_dir, device=device)
        layers = MegatronConverter._gpt2_layers if mt == "gpt2" else MegatronConverter._bert_layers
        for probe in probes:
            yield from layers(model, _on(probe, device))
    elif mt == "mobilebert":
        from enc.converters.mobilebert_tf.converter import hf_mobilebert_activations
        from enc.models.mobilebert import from_pretrained

        model = from_pretrained(out_dir, device=device, head="pretraining")
        for probe in probes:
            yield from hf_mobilebert_activations(model, _on(probe, device))
    elif mt in ("mistral", "mixtral"):
        from enc.converters.mistral import converted_forward

        for probe in probes:
            yield from converted_forward(Path(out_dir), _on(probe, device), device=device)
    else:
        raise ConfigError(Path(out_dir) / "config.json", f"enc verify has no enc runtime for model_type {mt!r}; "
                                                         "try --runtime transformers")


# transformers: model_type -> (layer list, final norm, {activation name: output field}); None = use hidden_states
_HF_LAYOUT: dict[str, tuple[str | None, str | None, dict[str, str]]] = {
    "albert": (None, None, {"mlm_logits": "prediction_logits|logits", "sop_logits": "sop_logits"}),
    "megatron-bert": ("bert.encoder.layer", "bert.encoder.ln",
                      {"mlm_logits": "prediction_logits|logits", "nsp_logits": "seq_relationship_logits"}),
    "mobilebert": (None, None, {"mlm_logits": "prediction_logits|logits", "nsp_logits": "seq_relationship_logits"}),
    "gpt2": ("transformer.h", "transformer.ln_f", {"logits": "logits"}),
    "mistral": ("model.layers", "model.norm", {"logits": "logits"}),
    "mixtral": ("model.layers", "model.norm", {"logits": "logits"}),
}


def _auto_class(transformers, arch: str):
    for suffix, auto in (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForPreTraining", "AutoModelForPreTraining"), ("ForMaskedLM", "AutoModelForMaskedLM")):
        if arch.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependency(None, "--runtime transformers needs the transformers package: "
                                      "pip install 'enc[hf]' (or pip install transformers)") from None
    try:
        transformers.utils.logging.disable_progress_bar()  # stderr stays one line per problem
    except AttributeError:
        pass
    return transformers


def load_transformers_model(out_dir: Path, auto: str, device: str = "cpu"):
    """``transformers.<auto>.from_pretrained(out_dir)`` in the weights' dtype, on ``device``, in eval mode."""
    from enc.parity import weights_dtype

    transformers = import_transformers()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    model = getattr(transformers, auto).from_pretrained(str(out_dir), **{dtype_kw: weights_dtype(Path(out_dir))})
    return model.to(device).eval()


def transformers_activations(out_dir: Path, probes: Sequence[Probe], device: str = "cpu") -> Iterator[Activation]:
    """transformers' own model class, loaded from ``out_dir``, yielding the names enc's parity uses.

    Layer outputs are captured with forward hooks (transformers' ``hidden_states`` puts the final norm
    into its last entry for decoders and Megatron-BERT), the embeddings are ``hidden_states[0]``.
    """
    from enc.models.loading import read_config

    transformers = import_transformers()
    cfg = read_config(out_dir)
    mt = cfg.get("model_type")
    if mt not in _HF_LAYOUT:
        raise ConfigError(Path(out_dir) / "config.json", f"no transformers layout known for model_type {mt!r}")
    layers_path, norm_path, heads = _HF_LAYOUT[mt]
    arch = (cfg.get("architectures") or [""])[0]
    from enc.parity import weights_dtype

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    model = _auto_class(transformers, arch).from_pretrained(str(out_dir), **{dtype_kw: weights_dtype(Path(out_dir))})
    model.to(device).eval()
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def grab(name: str):
        def hook(_m, _i, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def find(path: str):
        m = model
        for part in path.split("."):
            m = getattr(m, part)
        return m

    if layers_path is not None:
        for i, layer in enumerate(find(layers_path)):
            handles.append(layer.register_forward_hook(grab(f"layer.{i}")))
    if norm_path is not None:
        handles.append(find(norm_path).register_forward_hook(grab("final_norm")))
    try:
        for probe in probes:
            p = _on(probe, device)
            kw = {"attention_mask": p.attention_mask, "output_hidden_states": True}
            if p.token_type_ids is not None:
                kw["token_type_ids"] = p.token_type_ids
            captured.clear()
            with torch.inference_mode():
                out = model(p.input_ids, **kw)
            m = probe.attention_mask.bool()
            hs = out.hidden_states
            yield Activation("embeddings", hs[0].float(), mask=m)
            if layers_path is None:
                for i, h in enumerate(hs[1:]):
                    yield Activation(f"layer.{i}", h.float(), mask=m)
            else:
                for i in range(len(find(layers_path))):
                    yield Activation(f"layer.{i}", captured[f"layer.{i}"].float(), mask=m)
                yield Activation("final_norm", captured["final_norm"].float(), mask=m)
            for name, fields in heads.items():
                t = next((getattr(out, f, None) for f in fields.split("|") if getattr(out, f, None) is not None),
                         None)
                if t is not None:
                    yield Activation(name, t.float(), "logits", m if t.dim() == 3 else None)
    finally:
        for h in handles:
            h.remove()


def runtime_activations(runtime: str, out_dir: Path, probes: Sequence[Probe], device: str = "cpu",
                        meta: dict | None = None):
    if runtime == "enc":
        return enc_activations(out_dir, probes, device, meta)
    if runtime == "transformers":
        import_transformers()
        hook = format_runtime(meta, "transformers")
        if hook is not None:
            return hook(Path(out_dir), [_on(p, device) for p in probes], meta.get("context") or {}, device)
        return transformers_activations(out_dir, probes, device)
    from enc.errors import UsageError

    raise UsageError(None, f"unknown runtime {runtime!r} (choose {' or '.join(RUNTIMES)})")


def parity_with_runtime(converter, out_dir: Path, runtime: str = "enc", device: str = "cpu"):
    """``enc parity`` with the converted side run by ``runtime`` (reference: the original layout)."""
    from enc.parity import compare, run_parity, weights_dtype

    if runtime == "enc" and device == "cpu":
        return run_parity(converter, out_dir)
    probes = converter.probes()
    ctx = getattr(converter, "verify_context", None)
    meta = {"format": converter.name, "context": ctx() if callable(ctx) else {}}
    with torch.inference_mode():
        return compare(converter.reference_activations(probes),
                       runtime_activations(runtime, Path(out_dir), probes, device, meta), weights_dtype(Path(out_dir)))


def check_weight_files(out_dir: Path) -> None:
    """Every safetensors file's header fits the file: no tensor outside the data, no trailing gap."""
    from enc.io.safetensors_in import read_header
    from enc.models.loading import weight_files

    for path in weight_files(out_dir):
        if path.suffix != ".safetensors":
            continue
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
        have = path.stat().st_size - 8 - n
        try:
            entries, _ = read_header(path)  # every data_offsets pair checked against the header and file size
        except CorruptCheckpoint as e:
            if "lie outside the data section" in e.message:
                raise CorruptCheckpoint(path, f"truncated: {e.message}") from None
            raise
        need = max((e.offset + e.nbytes - 8 - n for e in entries.values()), default=0)
        if need != have:
            what = "truncated" if need > have else "has trailing bytes"
            raise CorruptCheckpoint(path, f"{what}: the header describes {need} bytes of tensor data, the file holds "
                                          f"{have}")


# --------------------------------------------------------------------------- hashes


def check_hashes(out_dir: Path) -> dict:
    """Every file ``enc_provenance.json`` lists, against its recorded size and sha256."""
    from enc.convert import fingerprint as file_hash

    prov_path = Path(out_dir) / PROVENANCE_FILE
    if not prov_path.is_file():
        raise MissingFile(prov_path, "no enc_provenance.json, so no hashes to check (use --no-hash to check "
                                     "numerics only)")
    try:
        prov = json.loads(prov_path.read_text())
        outputs = prov["outputs"]
        listed = [(str(o["file"]), int(o["bytes"]), str(o["sha256"] if "sha256" in o else o["sha256_head_tail"]),
                   "sha256" in o) for o in outputs]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(prov_path, "records no output hashes (written by an older enc?); use --no-hash") from None
    failures: list[dict] = []
    partial: list[str] = []  # large files of a --no-verify conversion: size, first and last MiB only
    for name, size, sha, full in listed:
        p = Path(out_dir) / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ConfigError(prov_path, f"output entry {name!r} is not a plain file name")
        if not p.is_file():
            failures.append({"file": name, "why": "missing (listed in enc_provenance.json)"})
            continue
        got = p.stat().st_size
        if got != size:
            failures.append({"file": name, "why": f"{got} bytes, provenance records {size} (truncated or replaced)"})
            continue
        if not full:
            partial.append(name)
            if file_hash(p).get("sha256_head_tail") != sha:
                failures.append({"file": name, "why": "first or last MiB differs from enc_provenance.json "
                                                      "(contents changed)"})
            continue
        if file_hash(p, full=True)["sha256"] != sha:
            failures.append({"file": name, "why": "sha256 differs from enc_provenance.json (contents changed)"})
    known = {n for n, _, _, _ in listed} | {PROVENANCE_FILE}
    unlisted = sorted(p.name for p in Path(out_dir).iterdir() if p.is_file() and p.name not in known)
    return {"checked": len(listed), "failed": failures, "unlisted": unlisted, "head_tail_only": partial,
            "verdict": "pass" if not failures else "fail"}


def output_hashes(out_dir: Path, full: bool = True) -> list[dict]:
    """Size and sha256 of every file in ``out_dir`` (for ``enc_provenance.json``; the provenance itself
    excluded). ``full=False`` (``enc convert --no-verify``): files over 64 MiB get the fingerprint of
    their size, first and last MiB (``sha256_head_tail``) instead of a pass over every byte."""
    from enc.convert import fingerprint as file_hash

    return [file_hash(p, full=full) for p in sorted(Path(out_dir).iterdir())
            if p.is_file() and p.name != PROVENANCE_FILE]


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    model: str
    runtime: str
    device: str
    verdict: str = "pass"
    first_failure: str | None = None
    hashes: dict | None = None
    numerics: dict | None = None
    record: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1


def _judge(entry: Entry, rec: Record, i: int, act: Activation, th, dims: int, seed: int):
    from enc.parity import Row, measure

    ref = rec.tensors[f"act.{i:04d}.proj"].double()
    mask = rec.tensors.get(f"act.{i:04d}.mask") if entry.masked else None
    rows = _positions(act.tensor, mask)
    if rows.shape != (entry.positions, entry.features):
        return Row(entry.name, entry.kind, float("inf"), float("inf"), float("inf"), -1.0, passed=False,
                   why=f"shape {tuple(rows.shape)} (positions x features) != record "
                       f"{(entry.positions, entry.features)}")
    got = fingerprint(rows, dims, seed)  # the shape read_record checked the record's against
    row = measure(Activation(entry.name, ref), Activation(entry.name, got), th)
    row.kind = entry.kind
    idx = rec.tensors.get(f"act.{i:04d}.topk_idx")
    if idx is not None:
        k5 = min(5, idx.shape[1])
        mine = rows.topk(k5, dim=1).indices
        same = mine[:, 0] == idx[:, 0]
        row.top1 = same.double().mean().item()
        row.top5 = ((mine.unsqueeze(2) == idx[:, :k5].unsqueeze(1)).any(2).double().sum(1) / k5).mean().item()
        val = rec.tensors.get(f"act.{i:04d}.topk_val")
        judged = row.top1
        if val is not None and tuple(val.shape) == tuple(idx.shape):
            ties = _top1_ties(mine[:, 0], idx, val.double(), got - ref, entry.features) & ~same
            row.top1_ties = ties.double().mean().item()
            judged = row.top1 + row.top1_ties
        if th.top1 is not None and judged < th.top1:
            tie_note = f" (+{row.top1_ties:.3f} within noise)" if row.top1_ties else ""
            row.why = "; ".join(w for w in (row.why, f"top-1 {row.top1:.3f}{tie_note} < {th.top1}") if w)
            row.passed = False
    return row


TIE_SIGMAS = 4.0  # a reference margin within this many standard deviations of the run's logit error is a tie


def _top1_ties(mine: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, fp_diff: torch.Tensor,
               features: int) -> torch.Tensor:
    """Per position: our top-1 id is one of the reference's recorded top-k and the reference's own margin
    between its top-1 and ours is within ``TIE_SIGMAS`` standard deviations of this run's error.

    A replay runs the whole model in the converted dtype, so its logits carry the rounding of every layer
    (``enc parity`` judges each layer from the reference's input instead). On a model whose logits are
    nearly flat (random weights, a uniform head) that error exceeds the gaps between the top ids and
    swaps them; such a swap says nothing about the conversion. The error per logit is estimated from the
    fingerprints: the Rademacher projection keeps squared norms on average, so the error norm of a
    position's ``features`` logits is about that of its fingerprint difference."""
    sigma = fp_diff.norm(dim=1) / max(1, features) ** 0.5
    hit = idx == mine.unsqueeze(1)
    found = hit.any(1)
    ours = torch.where(found, (val * hit).sum(1), torch.full_like(val[:, 0], float("inf")))
    return found & (val[:, 0] - ours <= TIE_SIGMAS * sigma)


def verify(out_dir: Path, *, runtime: str = "enc", device: str = "cpu", hashes: bool = True,
           numerics: bool = True) -> VerifyResult:
    """Check ``out_dir`` against its golden record and its provenance hashes (no original needed)."""
    from enc.models.loading import read_config
    from enc.parity import THRESHOLDS, ParityReport, Thresholds, weights_dtype

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MissingFile(out_dir, "not a directory")
    read_config(out_dir)
    if runtime not in RUNTIMES:
        from enc.errors import UsageError

        raise UsageError(None, f"unknown runtime {runtime!r} (choose {' or '.join(RUNTIMES)})")
    res = VerifyResult(str(out_dir), runtime, device)
    rec = read_record(out_dir) if numerics else None
    if runtime == "transformers" and numerics:
        import_transformers()
    if hashes:
        res.hashes = check_hashes(out_dir)
        if res.hashes["unlisted"]:
            res.warnings.append(f"files not in enc_provenance.json (not checked): {', '.join(res.hashes['unlisted'])}")
        if res.hashes["failed"]:
            f = res.hashes["failed"][0]
            res.verdict, res.first_failure = "fail", f"{f['file']}: {f['why']}"
    if rec is not None:
        meta = rec.meta
        res.record = {k: meta.get(k) for k in ("version", "recipe", "format", "dtype", "enc_version", "created")}
        try:
            dtype = weights_dtype(out_dir)  # reads the (validated) safetensors headers
        except EncError as e:
            if res.verdict != "fail":
                raise
            res.warnings.append(f"numerics not run: {e.one_line()}")  # the hashes already say why
            res.seconds = time.perf_counter() - t0
            return res
        dname = str(dtype).replace("torch.", "")
        th = THRESHOLDS.get(dtype, THRESHOLDS[torch.float32])
        recorded = (meta.get("thresholds") or {}).get(dname)
        if recorded:
            try:
                th = Thresholds(**recorded)  # the bounds in force when the record was made
            except TypeError:
                res.warnings.append(f"the record's {dname} thresholds are not understood; using enc's current ones")
        if dname != meta.get("dtype"):
            res.warnings.append(f"weights are {dname}, the record was made for a {meta.get('dtype')} conversion; "
                                f"judged with the {dname} thresholds")
        report = ParityReport(dname, th)
        dims, seed = int(meta["recipe"]["dims"]), int(meta["recipe"]["seed"])
        index = {(e.name, e.probe): i for i, e in enumerate(rec.entries)}
        got: dict[int, object] = {}
        seen: dict[str, int] = {}
        try:
            check_weight_files(out_dir)
            with torch.inference_mode():
                for act in runtime_activations(runtime, out_dir, rec.probes, device, meta):
                    p = seen.get(act.name, 0)
                    seen[act.name] = p + 1
                    i = index.get((act.name, p))
                    if i is None:
                        res.warnings.append(f"activation {act.name!r} (probe {p}) is not in the record; not judged")
                        continue
                    got[i] = _judge(rec.entries[i], rec, i, act, th, dims, seed)
        except Exception as e:  # noqa: BLE001
            if res.verdict == "fail":  # the hashes already explain why the model cannot even be run
                why = e.one_line() if isinstance(e, EncError) else f"{type(e).__name__}: {str(e).strip()[:200]}"
                res.warnings.append(f"numerics not run: {why}")
                res.seconds = time.perf_counter() - t0
                return res
            raise
        from enc.parity import Row

        for i, e in enumerate(rec.entries):
            row = got.get(i)
            if row is None:
                if runtime == "transformers":
                    res.warnings.append(f"activation {e.name!r} is not produced by the transformers runtime; "
                                        "not judged")
                    continue
                row = Row(e.name, e.kind, float("inf"), float("inf"), float("inf"), -1.0, passed=False,
                          why="not produced by the runtime")
            report.rows.append(row)
        tok_why = check_tokenizer(out_dir, meta["tokenizer"]) if meta.get("tokenizer") else None
        res.numerics = report.to_dict()
        res.numerics["tokenizer"] = ("not recorded" if not meta.get("tokenizer") else
                                     "pass" if tok_why is None else tok_why)
        if tok_why is not None:
            if res.verdict == "pass":
                res.verdict, res.first_failure = "fail", tok_why
            else:
                res.first_failure = f"{res.first_failure}; {tok_why}"
        res.numerics["rows_judged_on"] = f"{dims}-dim fingerprints ({RECIPE}) of the reference"
        if not report.passed:
            ff = report.first_failure
            why = f"activation {ff.name} diverges from the golden record: {ff.why}" if ff else "no activations"
            if res.verdict == "pass":
                res.verdict, res.first_failure = "fail", why
            else:
                res.first_failure = f"{res.first_failure}; {why}"
    res.seconds = time.perf_counter() - t0
    return res
