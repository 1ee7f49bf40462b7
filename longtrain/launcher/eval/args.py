"""Argument helpers shared by the `longtrain eval` commands: context lengths, depths, one-line errors."""

from __future__ import annotations

import argparse
import re

from longtrain.errors import ConfigError


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024, m = 1024**2); positive, deduplicated, ascending."""
    out: list[int] = []
    for part in str(text).split(","):
        s = part.strip().lower()
        if not s:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", s)
        if not m:
            raise ConfigError(f"bad context length {part.strip()!r}: use numbers like 512, 2k, 32k")
        n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2)]
        if n != int(n) or n <= 0:
            raise ConfigError(f"bad context length {part.strip()!r}: must be a positive whole number of tokens")
        out.append(int(n))
    if not out:
        raise ConfigError("no context lengths given (e.g. --lengths 1k,2k,4k)")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; every depth in [0, 1]."""
    out: list[float] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            d = float(part)
        except ValueError:
            raise ConfigError(f"bad depth {part.strip()!r}: use fractions of the context, e.g. 0,0.25,0.5,0.75,1") from None
        if not 0 <= d <= 1:
            raise ConfigError(f"depth {d} is outside [0, 1] (fraction of the context before the needle)")
        out.append(d)
    if not out:
        raise ConfigError("no depths given (e.g. --depths 0,0.25,0.5,0.75,1)")
    return sorted(set(out))


class EvalParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, through the CLI's error path
        raise ConfigError(f"eval {self.prog.split()[-1]}: {message}")
