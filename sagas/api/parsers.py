"""A JSON request parser that answers every body with a 400 at worst, never a 500.

Its own module, importing no view: DRF imports the classes named in `DEFAULT_PARSER_CLASSES`
while `rest_framework.views` loads, and a module that imports views back would be circular.
"""

from __future__ import annotations

import math
import re
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.utils import json

# Python's JSON parser recurses once per level of nesting and fails with a RecursionError (a
# 500) a few hundred levels down, fewer on a deep stack: bodies deeper than this are refused first.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_deeper_than(text: str, limit: int) -> bool:
    """Whether the brackets outside strings nest deeper than `limit` (without parsing)."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def _json_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: as out of range as the Infinity literal
        raise ValueError(f"Out of range float values are not JSON compliant: {text[:40]!r}")
    return value


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        raise ValueError(f"Integer too long: {len(text)} digits.") from None


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, made to fail with a 400 (`ParseError`) on every body, never a 500.

    Besides malformed JSON and bytes not in the request's charset, it refuses nesting deeper
    than `MAX_JSON_DEPTH`, NaN and Infinity, numbers beyond a float's range (1e400) and integers
    too long to convert. A project names it in `REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]`.
    """

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            text = stream.read().decode(encoding)
            if _json_deeper_than(text, MAX_JSON_DEPTH):
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels.")
            return json.loads(text, parse_float=_json_finite_float, parse_int=_json_int)
        except (ValueError, LookupError) as exc:  # LookupError: a charset that is not text's
            raise ParseError(f"JSON parse error - {exc}") from exc


MAX_IDEMPOTENCY_KEY_LENGTH = 100
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")


def idempotency_key(request: Any) -> str | None:
    """The request's Idempotency-Key header, if any; a 400 if it is not a valid key."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise ValidationError(
            {
                "Idempotency-Key": [
                    f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters, no spaces."
                ]
            }
        )
    return key
