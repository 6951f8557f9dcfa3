"""Units, read and written one way: counts (MACs, parameters: '50M'), bytes ('256KiB'), durations
('30m') and latencies ('2ms'). Every parser takes the text and the flag or field it came from, and
raises `InputError` naming both and what is accepted."""

from __future__ import annotations

import math
import re

from nas_kd.core.errors import InputError

_NUMBER = r"(?P<num>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)"

# ---------------------------------------------------------------- counts

_COUNT = re.compile(rf"^\s*{_NUMBER}\s*(?P<suffix>[kKmMgG]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str, what: str = "budget") -> int:
    """'300K', '50M', '1.5G', '2.5e6' -> an integer count (decimal suffixes: 1M = 1e6)."""
    m = _COUNT.match(str(text))
    value = float(m["num"]) * _SUFFIX[m["suffix"].lower()] if m else math.nan
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{what} {text!r} is not a positive count; use a number with an optional "
                         "K/M/G suffix (decimal), e.g. 300K, 50M, 1.5G or 2.5e6")
    return int(round(value))


def format_count(n: float, unit: str = "") -> str:
    """12_345_678 -> '12.35M', with `unit` after the suffix ('12.35MB'; decimal suffixes, as the
    budgets take them)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}{unit}"
    return f"{n:.4g}{unit}"


# ---------------------------------------------------------------- bytes

_BYTES = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[kKmMgG]i?[bB]?|[bB])?\s*$")


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """'256K' (decimal, 256,000 bytes), '256KiB' (binary, 262,144), '1.5M', '4096' -> bytes."""
    m = _BYTES.match(str(text))
    value = math.nan
    if m:
        unit = (m["unit"] or "").lower().rstrip("b")
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}[unit]
        value = float(m["num"]) * scale
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{what} {text!r} is not a positive number of bytes; use a number with an optional "
                         "K/M/G (decimal) or KiB/MiB/GiB (binary) suffix, e.g. 256K or 320KiB")
    return int(round(value))


def format_bytes(n: float) -> str:
    """256_000 -> '256KB' (decimal)."""
    return format_count(n, "B")


# ---------------------------------------------------------------- durations

_DURATION = re.compile(r"^\s*(?:(?P<h>\d+(?:\.\d+)?)h)?\s*(?:(?P<m>\d+(?:\.\d+)?)m)?\s*(?:(?P<s>\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str, what: str = "--time-budget") -> float:
    """'90s', '30m', '2h', '1h30m', '1.5h' -> seconds. A unit is required: s, m or h."""
    m = _DURATION.match(str(text))
    seconds = math.nan
    if m and any(m.group(k) for k in "hms"):
        seconds = sum(float(m.group(k) or 0) * scale for k, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{what} {text!r} is not a duration; use a number with s, m or h, e.g. 90s, 30m, 2h "
                         "or 1h30m")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the plan and progress lines show them: '45s', '290s', '18m', '1h05m' (seconds
    under ten minutes)."""
    seconds = max(0.0, seconds)
    if seconds < 600:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# ---------------------------------------------------------------- latencies

_LATENCY = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>us|µs|ms)\s*$")


def parse_latency(text: str, what: str = "--latency-budget") -> float:
    """'2ms', '500us', '0.8 ms' -> milliseconds. A unit is required: us (or µs) or ms."""
    m = _LATENCY.match(str(text))
    value = float(m["num"]) / (1000.0 if m["unit"] in ("us", "µs") else 1.0) if m else math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{what} {text!r} is not a positive time with a unit; use a number with us or ms, "
                         "e.g. 500us or 2ms")
    return value
