"""A text corpus every install has offline, for teacher-forced head training: Python's stdlib.

Two kinds of document per stdlib module: its source (code) and its docstrings laid out as
reference prose (the nearest thing to explanatory English the stdlib ships besides pydoc_data,
which the perplexity stage scores and so stays out of training). Each training sequence is an
assistant turn of the target's chat template that holds a slice of one document, answering a
short user request for it: the benchmark decodes assistant turns after that template, and an
instruct model's hidden states (and its next-token choices) depend on the role it is writing in.
"""

from __future__ import annotations

import ast
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lab.prompts import Prompt, encode

KINDS = ("code", "prose")
# Not corpus material: test suites, the perplexity stage's corpus (pydoc_data), generated tables
# (encodings), GUI demos, and the vendored pip wheel.
SKIP = frozenset({"test", "tests", "idle_test", "idlelib", "pydoc_data", "encodings", "lib2to3",
                  "turtledemo", "ensurepip", "tkinter", "site-packages", "dist-packages",
                  "__pycache__"})  # fmt: skip
MIN_CHARS = 400  # shorter documents carry too little text to be worth a sequence
REQUESTS = {
    "code": "Write the Python source of the standard library module `{module}`.",
    "prose": "Document the Python standard library module `{module}`: what it offers and how "
    "each of its functions and classes is used.",
}


@dataclass(frozen=True)
class Document:
    """One text of the corpus: a stdlib module's source or its docstrings."""

    module: str  # dotted name, e.g. json.decoder
    kind: str  # one of KINDS
    path: Path

    def text(self) -> str:
        """The document's text; "" for a file that is not Python (a few are templates)."""
        source = self.path.read_text(encoding="utf-8", errors="replace")
        if self.kind == "code":
            return source
        try:
            return prose(source)
        except SyntaxError:
            return ""


@dataclass
class Sequence:
    """A training sequence: the chat prefix (user request) and a slice of a document's tokens."""

    module: str
    kind: str
    prefix: list[int]  # the request, chat-formatted, up to where the assistant's text begins
    content: list[int]  # the slice of the document, as the assistant's text

    @property
    def tokens(self) -> list[int]:
        return self.prefix + self.content


def stdlib_root() -> Path:
    """The stdlib source folder of this interpreter; a clear error where it ships without."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "json" / "decoder.py").is_file():
        raise FileNotFoundError(
            f"no stdlib source under {root} (an install with only byte-code?): the heads' text "
            "corpus needs it; set distill.corpus_tokens: 0 to train on self-distilled answers only"
        )
    return root


def version() -> str:
    """What decides the corpus's text: the Python version whose stdlib it is."""
    return f"CPython {sys.version.split()[0]} stdlib"


def modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, file) of every stdlib module outside SKIP, sorted by name."""
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if SKIP.isdisjoint(parts):
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return sorted(found)


def prose(source: str) -> str:
    """A module's docstrings as reference text: the module's, then each function and class's."""
    with warnings.catch_warnings():  # old modules have invalid escapes: not our concern
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                parts.append(f"## `{_signature(node)}`\n\n{doc}")
    return "\n\n".join(p for p in parts if p)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    return f"{node.name}({ast.unparse(node.args)})"


def documents(seed: int) -> list[Document]:
    """Every document, code and prose alternating, each kind in its own seeded module order.

    Nothing is read here: a document's text is read when a sequence first needs it.
    """
    found = modules(stdlib_root())
    by_kind = [[Document(name, kind, path) for name, path in found] for kind in KINDS]
    for kind, docs in zip(KINDS, by_kind, strict=True):
        random.Random(f"{seed}-{kind}").shuffle(docs)
    return [doc for pair in zip(*by_kind, strict=True) for doc in pair]


@dataclass
class _Chunks:
    """A document's tokens cut into slices, visited in a seeded order."""

    document: Document
    tokens: list[int]
    order: list[int] = field(default_factory=list)


def sequences(
    tokenizer: PreTrainedTokenizerBase, total_tokens: int, sequence_tokens: int, seed: int
) -> list[Sequence]:
    """Slices of exactly total_tokens document tokens, at most sequence_tokens each.

    Round robin over the documents, one slice of each per pass: a small budget spans as many
    modules as it has slices, and only the documents it reaches are tokenized.
    """
    if total_tokens < 0 or sequence_tokens < 1:
        raise ValueError(f"need total_tokens >= 0 and sequence_tokens >= 1, got "
                         f"{total_tokens} and {sequence_tokens}")  # fmt: skip
    if total_tokens == 0:  # no corpus wanted: not even the stdlib source is needed
        return []
    out: list[Sequence] = []
    left = total_tokens
    for chunks, index in _slices(tokenizer, documents(seed), sequence_tokens, seed):
        if left == 0:
            break
        start = index * sequence_tokens
        content = chunks.tokens[start : start + min(sequence_tokens, left)]
        doc = chunks.document
        request = Prompt(f"{doc.kind}:{doc.module}", doc.kind,
                         (REQUESTS[doc.kind].format(module=doc.module),))  # fmt: skip
        out.append(Sequence(doc.module, doc.kind, encode(request, tokenizer), content))
        left -= len(content)
    if left:
        raise ValueError(
            f"distill.corpus_tokens={total_tokens} exceeds the {total_tokens - left} tokens of "
            f"the corpus ({version()}, documents of at least {MIN_CHARS} characters)"
        )
    return out


def _slices(
    tokenizer: PreTrainedTokenizerBase, docs: list[Document], size: int, seed: int
) -> Iterator[tuple[_Chunks, int]]:
    """(document, slice index) in round-robin order until every slice was given once."""
    tokenized: list[_Chunks] = []
    for doc in docs:  # pass 0 reads and tokenizes lazily: a small budget stops early
        text = doc.text()
        if len(text) < MIN_CHARS:
            continue
        # verbose=False: a whole module is longer than the model's context, and is never fed whole
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        chunks = _Chunks(doc, [int(i) for i in ids])
        # A tail shorter than a quarter slice is left out: too little text to be a sequence.
        slices = len(ids) // size + (len(ids) % size >= max(1, size // 4))
        chunks.order = list(range(slices))
        random.Random(f"{seed}-{doc.kind}-{doc.module}").shuffle(chunks.order)
        tokenized.append(chunks)
        if chunks.order:
            yield chunks, chunks.order[0]
    depth = 1
    while any(len(c.order) > depth for c in tokenized):
        for chunks in tokenized:
            if len(chunks.order) > depth:
                yield chunks, chunks.order[depth]
        depth += 1
