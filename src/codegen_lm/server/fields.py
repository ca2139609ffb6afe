"""Reading a JSON request body field by field, each check failing with an APIError that names the field.

Written out rather than declared as pydantic models so that every message says what OpenAI's would
(the parameter, the rule, the value received) and every failure is a 400, not a framework's 422.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import APIError

MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """The fields of one JSON object; `prefix` names nested objects in messages ("parameters.top_p")."""

    def __init__(self, body: Any, prefix: str = "") -> None:
        if not isinstance(body, dict):
            where = f"'{prefix[:-1]}'" if prefix else "the request body"
            raise APIError(400, f"{where} must be a JSON object, got {type(body).__name__}", prefix[:-1] or None)
        self.body, self.prefix = body, prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.body.get(key, MISSING)
        return default if value is MISSING or value is None else value

    def given(self, key: str) -> Any:
        """The field's value, or MISSING when it is absent or null (both mean "the default")."""
        value = self.body.get(key, MISSING)
        return MISSING if value is None else value

    def fail(self, key: str, rule: str, value: Any = MISSING) -> APIError:
        got = "" if value is MISSING else f", got {_show(value)}"
        return APIError(400, f"'{self.name(key)}' {rule}{got}", self.name(key), "invalid_value")

    def integer(self, key: str, default: Any, low: int | None = None, high: int | None = None) -> Any:
        value = self.given(key)
        if value is MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer", value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, _range(low, high), value)
        return value

    def number(self, key: str, default: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> Any:
        value = self.given(key)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, "must be a finite number", value)
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise self.fail(key, _range(low, high, low_open), value)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.given(key)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false", value)
        return value

    def string(self, key: str, default: Any) -> Any:
        value = self.given(key)
        if value is MISSING:
            return default
        if not isinstance(value, str):
            raise self.fail(key, "must be a string", value)
        return value

    def stops(self, key: str, most: int) -> list[str]:
        """A string or a list of at most `most` strings; empty strings are dropped (OpenAI ignores them)."""
        value = self.raw(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise self.fail(key, "must be a string or a list of strings", value)
        if len(value) > most:
            raise self.fail(key, f"may hold at most {most} strings", value)
        return [s for s in value if s]

    def nested(self, key: str) -> Fields:
        return Fields(self.raw(key, {}), self.name(key) + ".")


def _range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"must be in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"must be {'>' if low_open else '>='} {low:g}"
    return f"must be <= {high:g}"
