"""Small pieces of wording shared by messages, tables and logs."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """'1 token', '2 tokens': ``n`` and the noun, plural unless n is one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
