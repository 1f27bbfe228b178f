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


def did_you_mean(name: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the choice ``name`` is a case or a typo away from
    or the start of (``Mixtral``, ``rtx4090``), else ""."""
    import difflib

    choices = list(choices)
    folded = {c.lower(): c for c in choices}
    key = name.lower()
    starting = [c for c in folded if c.startswith(key)] if len(key) >= 3 else []
    close = [key] if key in folded else starting if len(starting) == 1 else []
    close = close or difflib.get_close_matches(key, list(folded), n=1, cutoff=0.75)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""
