"""Human sizes such as ``25MB`` or ``12.6GB``, in binary units as the original CAI counted (1 MB = 2**20 bytes)."""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import ConfigError

UNITS = {"b": 1, "kb": 1024, "k": 1024, "mb": 1024**2, "m": 1024**2, "gb": 1024**3, "g": 1024**3,
         "tb": 1024**4, "t": 1024**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | float | int, default_unit: str = "b", what: str = "size") -> int:
    """Bytes in ``text`` (a number with an optional unit; bare numbers are in ``default_unit``).

    ConfigError names ``what`` (the option or field) and the reason for anything unparsable or not positive.
    """
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        value, unit = float(text), default_unit.lower()
    else:
        match = _SIZE_RE.fullmatch(str(text))
        if not match:
            raise ConfigError(f"{what}: cannot parse {text!r}; expected a number with an optional unit "
                              f"such as 25MB or 12.6GB")
        value, unit = float(match.group(1)), (match.group(2) or default_unit).lower()
    if unit not in UNITS:
        raise ConfigError(f"{what}: cannot parse {text!r}: unknown unit {unit!r}; use B, KB, MB, GB or TB")
    nbytes = value * UNITS[unit]
    if not math.isfinite(nbytes) or nbytes > 2**62:
        raise ConfigError(f"{what}: {text!r} is too large")
    if round(nbytes) < 1:
        raise ConfigError(f"{what}: {text!r} must be at least one byte")
    return int(round(nbytes))
