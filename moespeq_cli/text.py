"""Small pieces of wording shared by messages, tables and logs."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """'1 token', '2 tokens': ``n`` and the noun, plural unless n is one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def printable(name: str, most: int = 40) -> str:
    """A name from outside (a request's field or Host header, a folder in the cache) as a
    line may show it: as it is where printable and short, else escaped and cut (no line
    breaks or escape codes reach the terminal)."""
    return name if name.isprintable() and len(name) <= most else ascii(name[:most])
