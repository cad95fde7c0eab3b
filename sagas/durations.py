"""Durations as people write them in settings and on command lines: `30d`, `12h`, `90m`."""

from __future__ import annotations

import re
from datetime import timedelta

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"(\d+)([a-z]+)?")
EXAMPLE = "write a whole number and a unit, s, m, h, d or w (such as 30d, 12h or 90m)"
LONGEST = timedelta(days=100 * 365)


def parse_duration(text: str) -> timedelta:
    """`30d` is 30 days, `12h` 12 hours, `90m` 90 minutes (also `s` and `w`).

    Raises ValueError with a message that says what is wrong and what is expected.
    """
    written = text.strip().lower()
    match = _DURATION.fullmatch(written)
    if not written:
        raise ValueError(f"a duration is needed: {EXAMPLE}")
    if match is None:
        raise ValueError(f"{text.strip()!r} is not a duration: {EXAMPLE}")
    number, unit = int(match[1]), match[2]
    if unit is None:
        raise ValueError(f"{text.strip()!r} has no unit: {EXAMPLE}")
    if unit not in UNITS:
        raise ValueError(f"{text.strip()!r} has an unknown unit {unit!r}: {EXAMPLE}")
    if number == 0:
        raise ValueError(f"{text.strip()!r} is no time at all: the duration must be more than 0")
    try:
        duration = timedelta(**{UNITS[unit]: number})
    except OverflowError:
        duration = LONGEST * 2
    if duration > LONGEST:
        raise ValueError(f"{text.strip()!r} is more than 100 years")
    return duration
