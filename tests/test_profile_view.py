"""The live profile view fits the terminal it is drawn in: 80x24 included, with the lanes
scaled to the width and the residency map packed into the lines left."""

import pytest
from rich.console import Console

from moespeq_cli.profiling.live import render
from moespeq_cli.runtime.timeline import Interval


class FakeCache:
    name = "device"

    def __init__(self, resident):
        self.res = resident

    def resident(self, key):
        return key in self.res

    def ready(self, key):
        return key[1] % 3 != 0


@pytest.mark.parametrize("layers, experts", [(2, 8), (32, 8), (48, 128), (61, 256)])
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_view_fits_the_terminal(layers, experts, size):
    ivs = [Interval("compute", "compute", "x", i * 1e-3, i * 1e-3 + 5e-4, 0, None, 0, "target") for i in range(50)]
    ivs += [Interval("copy", "copy", "e", i * 1e-3, i * 1e-3 + 8e-4, 0, 1, 10, "target") for i in range(50)]
    cache = FakeCache({(layer, e) for layer in range(layers) for e in range(0, experts, 2)})
    stats = {"tokens_per_s": 12.5, "stall_share": 0.1, "overlap": 0.5, "hit_rate": 0.7, "acceptance": 0.8, "k": 2}
    stats |= {"tokens": 40, "mb": 12.0, "mb_read": None}
    view = render(
        "moespeq profile · test",
        ivs,
        0.05,
        0.05,
        cache,
        list(range(layers)),
        experts,
        {(0, 1)},
        stats,
        "Once upon a time\n" * 20,
        size=size,
    )
    console = Console(width=size[0], record=True, file=open("/dev/null", "w"))
    console.print(view)
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) <= size[1], len(lines)
    assert max(len(line) for line in lines) <= size[0]
    text = "\n".join(lines)
    assert "target" in text and "resident" in text and "tokens/s" in text


def test_the_preview_sends_no_control_character_to_the_terminal():
    """A model can generate ESC (and with it escape sequences): the preview line shows
    line breaks as ⏎ and every other control character as U+FFFD."""
    from moespeq_cli.profiling.live import printable

    shown = printable("a\nb\x1b[31mc\x03\td\x7f\x85e é")
    assert shown == "a ⏎ b\ufffd[31mc\ufffd d\ufffd\ufffde é"
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in shown)
