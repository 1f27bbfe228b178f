"""--help on a narrow terminal.

typer draws a command's options as a table of six columns (long names, short names,
negative names, negative short names, type, help). On an 80-column terminal the first
five take what they need and the help is left about 17 characters wide: a sentence
becomes a column of single words and long words are cut ("profiles/*.yam…"). Below
``NARROW`` columns this draws each panel with two: the names, with the type beneath them,
and the help beside them, as ``git`` and ``cargo`` lay out theirs. Wider terminals keep
typer's table. If a typer version changes the internals used here, its own layout is
drawn instead (help must never fail)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click
    from rich.table import Table
    from rich.text import Text

NARROW = 100  # columns below which a panel is drawn with two columns
NAMES_MAX = 24  # the names column's widest, in characters (longer names fold)


def names_cell(param: click.Parameter, ctx: click.Context, ru: ModuleType) -> Text:
    """A parameter's names on one line (``--top-p``, ``--prompt, -p``,
    ``--chat / --no-chat``), its type on the next (``<int range> [x>=1]``), styled as
    typer styles them (``ru``: typer's rich_utils)."""
    from rich.text import Text
    from typer.core import TyperArgument

    cell = Text()
    if getattr(param, "required", False):
        cell.append(ru.REQUIRED_SHORT_STRING + " ", style=ru.STYLE_REQUIRED_SHORT)
    if isinstance(param, TyperArgument):
        cell.append_text(
            ru.highlighter(param.display_name_raw + ("..." if param.metavar is None and param.nargs != 1 else ""))
        )
    else:
        longs = [s for s in param.opts if s.startswith("--")]
        cell.append_text(ru.highlighter(", ".join(longs + [s for s in param.opts if not s.startswith("--")])))
        if param.secondary_opts:
            cell.append(" / ")
            cell.append_text(ru.negative_highlighter(", ".join(param.secondary_opts)))
    kind = param.display_type_rich(ctx=ctx) or ""
    kind += ru.RANGE_STRING.format(r) if (r := param._get_number_range_help_str()) else ""
    if kind.strip():
        cell.append("\n")
        cell.append_text(ru.types_highlighter(Text(kind.strip(), style=ru.STYLE_TYPES)))
    return cell


def narrow_table(params: list, ctx: click.Context, markup_mode: str, width: int, ru: ModuleType) -> Table:
    """The panel's two columns: names and type, then the help (typer's own cell); the
    names column at most ``NAMES_MAX`` wide and a third of ``width``."""
    from rich.table import Table

    cells = [names_cell(p, ctx, ru) for p in params]
    widest = max(len(line) for c in cells for line in c.plain.splitlines())
    table = Table(show_header=False, box=None, expand=True, pad_edge=False, padding=(0, 1))
    table.add_column(width=min(widest, NAMES_MAX, max(width // 3, 8)), overflow="fold")
    table.add_column(ratio=1)
    for param, cell in zip(params, cells, strict=True):
        table.add_row(cell, ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode))
    return table


def install() -> None:
    """Draw typer's option panels with two columns on a narrow terminal."""
    try:
        import typer.rich_utils as ru
    except ImportError:  # typer without rich: click's own help, which wraps well
        return
    wide = getattr(ru, "_print_options_panel", None)
    if wide is None or getattr(wide, "narrow_aware", False):
        return

    def panel(**kw) -> None:
        console = kw.get("console")
        if kw.get("params") and console is not None and console.width < NARROW:
            from rich.panel import Panel

            try:  # rich renders the whole panel before writing: a failure prints nothing
                table = narrow_table(kw["params"], kw["ctx"], kw["markup_mode"], console.width, ru)
                border, align = ru.STYLE_OPTIONS_PANEL_BORDER, ru.ALIGN_OPTIONS_PANEL
                console.print(Panel(table, border_style=border, title=kw["name"], title_align=align))
                return
            except Exception:  # noqa: BLE001 - another typer's internals: its own layout
                pass
        wide(**kw)

    panel.narrow_aware = True
    ru._print_options_panel = panel
