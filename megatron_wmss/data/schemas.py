"""Row schemas of supervised data and their normalisation to chat messages.

Every accepted layout becomes a list of ``{"role", "content"}`` messages; the assistant
messages are the supervised (completion) part. Flat layouts become one user and one
assistant turn, with an optional ``system`` column in front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SCHEMA_FIELDS",
    "DataFormatError",
    "accepted_schemas",
    "detect_schema",
    "has_completion",
    "row_to_messages",
    "schema_columns",
]

#: Required fields of each schema, in the order "auto" tries them.
SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "instruction_output": ("instruction", "output"),
}
# Optional extras that a flat schema folds into the prompt when present.
_OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": (),
    "prompt_completion": ("system",),
    "question_answer": ("system",),
    "instruction_output": ("system", "input"),
}

Message = dict[str, str]


class DataFormatError(ValueError):
    """A data file or row does not have an accepted shape; the message names where and why."""


def accepted_schemas() -> str:
    """One line listing the accepted schemas and their fields, for error messages."""
    parts = []
    for name, fields in SCHEMA_FIELDS.items():
        shown = "messages [{role, content}]" if name == "chat" else " + ".join(fields)
        extra = _OPTIONAL_FIELDS[name]
        parts.append(f"{name}: {shown}" + (f" (optional {', '.join(extra)})" if extra else ""))
    return "; ".join(parts)


def detect_schema(columns: Iterable[str], requested: str, source: str) -> str:
    """Schema of a table with ``columns``: ``requested`` if it fits, else the first that does."""
    present = set(columns)
    if requested != "auto":
        missing = [f for f in SCHEMA_FIELDS[requested] if f not in present]
        if missing:
            raise DataFormatError(
                f"{source}: schema {requested!r} needs field(s) {missing}, found columns "
                f"{sorted(present)}; accepted schemas: {accepted_schemas()}")
        return requested
    for name, fields in SCHEMA_FIELDS.items():
        if all(f in present for f in fields):
            return name
    raise DataFormatError(
        f"{source}: columns {sorted(present)} match no accepted schema; "
        f"accepted schemas: {accepted_schemas()}")


def schema_columns(schema: str, columns: Iterable[str]) -> list[str]:
    """Columns of a table that ``row_to_messages`` reads for ``schema``."""
    present = set(columns)
    return [*SCHEMA_FIELDS[schema], *(f for f in _OPTIONAL_FIELDS[schema] if f in present)]


def _text(row: Mapping[str, Any], field: str, schema: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataFormatError(
            f"{where}: field {field!r} is {got}, expected a string (schema {schema!r}); "
            f"accepted schemas: {accepted_schemas()}")
    return value


def _chat_messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(
            f"{where}: field 'messages' is {value!r:.80}, expected a non-empty list of "
            f"{{role, content}}; accepted schemas: {accepted_schemas()}")
    messages = []
    for turn, message in enumerate(value):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise DataFormatError(
                f"{where}: messages[{turn}] = {message!r:.80} needs a non-empty string 'role' "
                f"and a string 'content'")
        # Extra keys (AM-DeepSeek-R1-Distilled keeps an `info` struct per message) are ignored.
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            f"{where}: the last message has role {messages[-1]['role']!r}; a training "
            f"conversation must end with an 'assistant' message (its completion)")
    return messages


def row_to_messages(schema: str, row: Mapping[str, Any], where: str) -> list[Message]:
    """Chat messages of one row of ``schema``; ``where`` names the row in errors."""
    if schema == "chat":
        return _chat_messages(row.get("messages"), where)
    prompt_field, completion_field = SCHEMA_FIELDS[schema]
    prompt = _text(row, prompt_field, schema, where)
    completion = _text(row, completion_field, schema, where)
    extra_input = row.get("input") if schema == "instruction_output" else None
    if isinstance(extra_input, str) and extra_input.strip():
        # Alpaca layout: the instruction, then its input, separated by a blank line.
        prompt = f"{prompt}\n\n{extra_input}"
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": completion})
    return messages


def has_completion(messages: list[Message]) -> bool:
    """Whether some assistant message has non-whitespace content (something to learn)."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)
