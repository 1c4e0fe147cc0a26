"""Benchmark prompt suites (built-in or any Spec-Bench-style question.jsonl) and their encoding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing transformers is slow; only the type checker needs it here
    from transformers import PreTrainedTokenizerBase

CATEGORIES: tuple[str, ...] = (
    "code",
    "math_reasoning",
    "qa",
    "summarization",
    "extraction",
    "writing",
)
BUILTIN = "builtin"
BUILTIN_TRAIN = "builtin-train"

# The suites ship inside the package (see package-data in pyproject.toml), so they resolve the
# same way from a checkout, an editable install or a wheel.
_DATA_DIR = Path(__file__).parent / "data"
_BUILTIN_FILES = {
    BUILTIN: _DATA_DIR / "prompts.jsonl",
    BUILTIN_TRAIN: _DATA_DIR / "train_prompts.jsonl",
}
_REQUIRED_KEYS = ("question_id", "category", "turns")


@dataclass(frozen=True)
class Prompt:
    """One benchmark question: an id, a category and its user turns."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]


class PromptError(ValueError):
    """A prompt source that cannot be read, or a selection it cannot satisfy."""


def load_suite(
    source: str = BUILTIN,
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
) -> list[Prompt]:
    """Prompts from `source`, grouped by category, the first `per_category` of each (None: all)."""
    if per_category is not None and per_category <= 0:
        raise PromptError(
            f"per_category must be a positive integer or None (all), got {per_category}"
        )
    path = _resolve(source)
    prompts = _read_jsonl(path)
    wanted = _select_categories(prompts, categories, path)
    selected: list[Prompt] = []
    for category in wanted:
        in_category = [p for p in prompts if p.category == category]
        selected.extend(in_category if per_category is None else in_category[:per_category])
    return selected


def render(
    prompt: Prompt,
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool | None = None,
    answers: Sequence[str] = (),
) -> str:
    """Turn len(answers) + 1 as model input: the earlier turns with the model's own answers.

    Chat-formatted iff asked, or by default iff the tokenizer has a template. This is how
    Spec-Bench runs mt_bench: the second question follows the model's answer to the first.
    """
    if len(answers) >= len(prompt.turns):
        raise PromptError(
            f"prompt {prompt.question_id} has {len(prompt.turns)} turn(s); "
            f"{len(answers)} answer(s) leave none to ask"
        )
    turns = prompt.turns[: len(answers) + 1]
    if not _wants_chat(tokenizer, use_chat_template):
        # Plain text: the conversation so far, one paragraph per message.
        return "\n\n".join(m for pair in zip(turns, [*answers, ""], strict=True) for m in pair if m)
    messages = []
    for turn, answer in zip(turns, [*answers, None], strict=True):
        messages.append({"role": "user", "content": turn})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # tokenize=False always gives a str; this narrows the type
        raise PromptError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def encode(
    prompt: Prompt,
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool | None = None,
    answers: Sequence[str] = (),
) -> list[int]:
    """Token ids of `render(...)`, with exactly the BOS the format calls for."""
    chat = _wants_chat(tokenizer, use_chat_template)
    text = render(prompt, tokenizer, chat, answers)
    # A chat template writes its own BOS into the text, so adding special tokens would double it;
    # this matches what apply_chat_template(tokenize=True) does. Plain text gets the usual ones.
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return [int(i) for i in ids]


def _wants_chat(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool | None) -> bool:
    """Whether to format with the chat template; asking for one the tokenizer lacks is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise PromptError(
            "use_chat_template=True but the tokenizer has no chat_template; "
            "pass use_chat_template=False or None"
        )
    return use_chat_template


def _resolve(source: str) -> Path:
    """The file behind a source name: a built-in suite or a path to a question.jsonl."""
    if source in _BUILTIN_FILES:
        return _BUILTIN_FILES[source]
    path = Path(source).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise PromptError(
            f"prompt file {problem}: {path} (source must be {BUILTIN!r}, {BUILTIN_TRAIN!r} "
            "or a path to a Spec-Bench-style question.jsonl)"
        )
    return path


def _read_jsonl(path: Path) -> list[Prompt]:
    """Every prompt in a question.jsonl, validated; extra keys (Spec-Bench has some) are ignored."""
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}  # str(question_id) -> line, so 7 and "7" also count as duplicates
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, a hand-edited gap) carry no prompt
            prompt = _parse_line(line, f"{path}:{lineno}")
            key = str(prompt.question_id)
            if key in seen:
                raise PromptError(
                    f"{path}:{lineno}: duplicate question_id {prompt.question_id!r} "
                    f"(first on line {seen[key]}); question_id must be unique"
                )
            seen[key] = lineno
            prompts.append(prompt)
    if not prompts:
        raise PromptError(f"prompt file has no prompts: {path}")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    """One JSON line -> Prompt; `where` (file:line) prefixes every error."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise PromptError(
            f"{where}: missing key(s) {', '.join(missing)}; "
            f"each line needs {', '.join(_REQUIRED_KEYS)}"
        )
    qid = record["question_id"]
    # bool is an int subclass, but a true/false id is surely a mistake.
    if isinstance(qid, bool) or not isinstance(qid, int | str) or qid == "":
        raise PromptError(f"{where}: question_id must be an int or a non-empty str, got {qid!r}")
    category = record["category"]
    if not isinstance(category, str) or not category.strip():
        raise PromptError(f"{where}: question_id {qid!r}: category must be a non-empty str")
    return Prompt(qid, category, _parse_turns(record["turns"], qid, where))


def _parse_turns(turns: Any, qid: int | str, where: str) -> tuple[str, ...]:
    """The turns of one record: a non-empty list of strings with visible text."""
    if not isinstance(turns, list) or not turns:
        raise PromptError(f"{where}: question_id {qid!r}: turns must be a non-empty list of str")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise PromptError(
                f"{where}: question_id {qid!r}: turn {i} is empty or not text; "
                "every turn must be a non-blank str"
            )
    return tuple(turns)


def _select_categories(
    prompts: list[Prompt], categories: Sequence[str] | None, path: Path
) -> list[str]:
    """The requested categories in order (None: all present, first-seen order), each checked."""
    present = list(dict.fromkeys(p.category for p in prompts))
    if categories is None:
        return present
    # A bare string is a Sequence[str] too; iterating it would ask for one-letter categories.
    requested = [categories] if isinstance(categories, str) else list(categories)
    if not requested:
        raise PromptError(
            f"categories is empty; pass None for all, or some of: {', '.join(present)}"
        )
    unknown = [c for c in requested if c not in present]
    if unknown:
        raise PromptError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
            f"in {path}; available: {', '.join(present)}"
        )
    return list(dict.fromkeys(requested))
