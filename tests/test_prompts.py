"""Prompt suites: the built-in data, loading any question.jsonl, its errors, and rendering."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lab.prompts import (
    BUILTIN,
    BUILTIN_TRAIN,
    CATEGORIES,
    Prompt,
    PromptError,
    encode,
    load_suite,
    render,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges (one token per byte) that prepends BOS; no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    """Each record as one JSON line; a str record is written verbatim (for malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(qid: int | str, category: str = "qa", text: str = "Why?") -> dict[str, Any]:
    return {"question_id": qid, "category": category, "turns": [text]}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# --- the built-in suites ---------------------------------------------------------------------


@pytest.mark.parametrize(("source", "minimum"), [(BUILTIN, 8), (BUILTIN_TRAIN, 20)])
def test_builtin_suites_cover_the_six_categories(source: str, minimum: int) -> None:
    suite = load_suite(source)
    counts = Counter(p.category for p in suite)
    assert tuple(counts) == CATEGORIES  # grouped, in the declared order
    assert min(counts.values()) >= minimum
    ids = [p.question_id for p in suite]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) for i in ids)
    assert all(p.turns and all(t.strip() for t in p.turns) for p in suite)


def test_builtin_summarization_prompts_carry_their_passage() -> None:
    for p in load_suite(categories=["summarization"]):
        # An instruction plus a passage of at least 80 words.
        assert len(p.turns[0].split()) >= 90, p.question_id
        assert "summar" in p.turns[0].lower(), p.question_id


def test_train_and_benchmark_suites_are_disjoint() -> None:
    bench, train = load_suite(BUILTIN), load_suite(BUILTIN_TRAIN)
    assert not {p.turns for p in bench} & {p.turns for p in train}
    assert not {p.question_id for p in bench} & {p.question_id for p in train}
    # Stricter than equality: no passage or sentence is shared (8 words in a row never recur).
    bench_grams = set().union(*(_ngrams(t, 8) for p in bench for t in p.turns))
    train_grams = set().union(*(_ngrams(t, 8) for p in train for t in p.turns))
    assert not bench_grams & train_grams


def test_per_category_takes_the_first_n_in_file_order() -> None:
    full = load_suite()
    picked = load_suite(per_category=3)
    for category in CATEGORIES:
        expected = [p for p in full if p.category == category][:3]
        assert [p for p in picked if p.category == category] == expected
    assert len(picked) == 3 * len(CATEGORIES)


def test_categories_select_and_order() -> None:
    picked = load_suite(categories=["writing", "code"], per_category=2)
    assert [p.category for p in picked] == ["writing", "writing", "code", "code"]
    assert load_suite(categories="code") == load_suite(categories=["code"])


# --- any Spec-Bench-style file ---------------------------------------------------------------


def test_spec_bench_shaped_file_with_extra_keys_loads(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "question.jsonl",
        [
            {
                "question_id": 81,
                "category": "mt_bench",
                "turns": [
                    "Write a travel blog post.",
                    "Rewrite it starting every sentence with A.",
                ],
                "reference": [],
            },
            {"question_id": 161, "category": "translation", "turns": ["Translate: Hallo."]},
            {"question_id": 241, "category": "rag", "turns": ["Q?"], "reference": ["x"]},
            {"question_id": 82, "category": "mt_bench", "turns": ["Draft an email."], "n": 1},
        ],
    )
    suite = load_suite(str(path))
    assert [p.category for p in suite] == ["mt_bench", "mt_bench", "translation", "rag"]
    assert suite[0] == Prompt(
        81, "mt_bench", ("Write a travel blog post.", "Rewrite it starting every sentence with A.")
    )
    assert [p.question_id for p in load_suite(str(path), per_category=1)] == [81, 161, 241]


# --- errors ----------------------------------------------------------------------------------


def _error(source: str, **kwargs: Any) -> str:
    with pytest.raises(PromptError) as info:
        load_suite(source, **kwargs)
    return str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    message = _error(str(path))
    assert str(path) in message and BUILTIN in message
    assert "directory" in _error(str(tmp_path))


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(1), '{"question_id": 2,', _record(3)])
    assert f"{path}:2" in _error(str(path))


def test_non_object_line_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(1), "[1, 2]"])
    assert f"{path}:2" in _error(str(path))


def test_missing_key_names_the_key_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(1), {"question_id": 2, "category": "qa"}])
    message = _error(str(path))
    assert f"{path}:2" in message and "turns" in message


@pytest.mark.parametrize("turns", [[], ["   \n"], ["ok", ""], "not a list", [3]])
def test_empty_or_bad_turns_name_the_question_id(tmp_path: Path, turns: Any) -> None:
    record = {"question_id": "q-42", "category": "qa", "turns": turns}
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(1), record])
    message = _error(str(path))
    assert "q-42" in message and f"{path}:2" in message


def test_bad_question_id_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(True)])
    assert "question_id" in _error(str(path))


def test_duplicate_question_id_names_it(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [_record(7), _record(8), _record(7, "code")])
    message = _error(str(path))
    assert "duplicate question_id 7" in message and f"{path}:3" in message


def test_unknown_category_lists_the_available_ones() -> None:
    message = _error(BUILTIN, categories=["code", "poetry"])
    assert "poetry" in message
    assert all(c in message for c in CATEGORIES)
    assert "empty" in _error(BUILTIN, categories=[])


@pytest.mark.parametrize("n", [0, -1])
def test_per_category_must_be_positive(n: int) -> None:
    assert str(n) in _error(BUILTIN, per_category=n)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert "no prompts" in _error(str(path))


# --- render and encode -----------------------------------------------------------------------

PROMPT = Prompt(1, "qa", ("What is 2 + 2?", "And times 3?"))


def test_render_without_a_chat_template_is_the_first_turn() -> None:
    assert render(PROMPT, _tokenizer()) == "What is 2 + 2?"


def test_render_with_a_chat_template_formats_only_the_first_turn() -> None:
    tok = _tokenizer(CHAT_TEMPLATE)
    assert render(PROMPT, tok) == "<s><|user|>\nWhat is 2 + 2?\n<|assistant|>\n"
    assert render(PROMPT, tok, use_chat_template=False) == "What is 2 + 2?"


def test_forcing_a_missing_chat_template_is_an_error() -> None:
    with pytest.raises(PromptError, match="chat_template"):
        render(PROMPT, _tokenizer(), use_chat_template=True)


def test_encode_adds_exactly_one_bos() -> None:
    plain, chat = _tokenizer(), _tokenizer(CHAT_TEMPLATE)
    bos = plain.bos_token_id
    plain_ids = encode(PROMPT, plain)
    assert plain_ids[0] == bos and plain_ids.count(bos) == 1
    assert plain.decode(plain_ids, skip_special_tokens=True) == "What is 2 + 2?"
    chat_ids = encode(PROMPT, chat)
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    assert chat.decode(chat_ids) == render(PROMPT, chat)
    assert all(isinstance(i, int) for i in chat_ids)
