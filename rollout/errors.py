"""One-line error messages for bad input: users read them in a terminal, not a traceback."""

from __future__ import annotations

import re

from pydantic import ValidationError

_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s'\"]*:)[^@\s'\"]+@")


def mask_secrets(text: str) -> str:
    """`scheme://user:password@host` → `scheme://user:***@host` wherever it occurs."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class InputError(Exception):
    """Bad input from a user (a file, a flag, an id); the message is one sentence."""


def describe_validation_error(err: ValidationError, where: str = "") -> str:
    """The first problem of a pydantic error as one sentence naming the field."""
    first = err.errors()[0]
    loc = ".".join(filter(None, [where, *(str(p) for p in first["loc"])]))
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{loc}'"
    if kind == "missing":
        return f"missing field '{loc}'"
    msg = first["msg"]
    msg = msg.removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return mask_secrets(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
