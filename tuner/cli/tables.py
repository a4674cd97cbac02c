"""Tables whose name column is never cut: the final screen's trials and the plan's candidates.

rich shrinks every column of a table wider than the console, names included, and ends a cut
cell in "…". A candidate's name is what the user types back (``--param``, ``vtune deploy``), so
the widths are chosen here instead (:func:`name_table`)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

NAME_HEADER = "candidate"
LEFT_HEADERS = ("candidate", "state", "regime")


def num(value: Any) -> str:
    """A figure for a table cell: three significant digits below 100, whole numbers (with
    thousands separators) above; "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def fits(out: Console, headers: list[str], rows: list[list[str]]) -> bool:
    """Whether a table of these cells fits the console with no cell wrapped (the name column
    whole, every other column as wide as its widest cell; only headers wrap)."""
    natural, cells, _ = _widths(headers, rows)
    chrome = _table_width(out, headers, natural) - sum(natural)
    return sum(cells) <= out.width - chrome


def name_table(
    out: Console, headers: list[str], rows: list[list[str]], title: str = "Trials"
) -> tuple[Table, list[str]]:
    """A table in which the ``candidate`` cells are never cut or wrapped, and the legend lines
    to print under it.

    Every column at its natural width when that fits; else the name column whole and the
    others down to their longest word, the room left going first to unwrapping cells (a state
    such as "failed: OOM"), then headers, each time to the columns that need the least of it;
    else, when even that does not fit, the table leaves the names out and the legend lists
    ``#: name`` in full (the ``#`` column is the first)."""
    name_col = headers.index(NAME_HEADER)
    natural, cells, shortest = _widths(headers, rows)
    chrome = _table_width(out, headers, natural) - sum(natural)
    room = out.width - chrome
    if sum(natural) <= room:
        return _make_table(headers, rows, natural, title), []
    widths = list(shortest)
    spare = room - sum(widths)
    if spare >= 0:
        for goal in (cells, natural):
            for j in sorted(range(len(headers)), key=lambda j: goal[j] - widths[j]):
                grant = max(0, min(spare, goal[j] - widths[j]))
                widths[j] += grant
                spare -= grant
        return _make_table(headers, rows, widths, title), []
    keep = [j for j in range(len(headers)) if j != name_col]
    table = _make_table(
        [headers[j] for j in keep], [[r[j] for j in keep] for r in rows], None, title
    )
    return table, [f"  {r[0]}: {r[name_col]}" for r in rows]


def print_name_table(
    out: Console,
    headers: list[str],
    rows: list[list[str]],
    title: str = "Trials",
    *,
    legend: bool = True,
) -> bool:
    """:func:`name_table`, printed with its legend (unless ``legend`` is False: one printed
    just above already names the same ``#``); returns whether the names went to a legend."""
    table, lines = name_table(out, headers, rows, title)
    out.print(table)
    for line in lines if legend else ():
        out.print(line, highlight=False, soft_wrap=True)
    return bool(lines)


def _widths(headers: list[str], rows: list[list[str]]) -> tuple[list[int], list[int], list[int]]:
    """Each column's natural width (header and cells on one line), its width with no cell
    wrapped (the header down to its longest word) and its longest word; the name column is
    whole in all three."""
    name_col = headers.index(NAME_HEADER)
    natural, cells, shortest = [], [], []
    for j, h in enumerate(headers):
        column = [r[j] for r in rows]
        longest_word = max(len(w) for c in [h, *column] for w in c.split() or [""])
        natural.append(max(len(c) for c in [h, *column]))
        cells.append(max([longest_word, *(len(c) for c in column)]))
        shortest.append(natural[j] if j == name_col else longest_word)
    cells[name_col] = natural[name_col]
    return natural, cells, shortest


def _make_table(
    headers: list[str], rows: list[list[str]], widths: list[int] | None, title: str
) -> Table:
    """The table; ``widths`` fixes each column's content width (None: rich decides)."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for j, header in enumerate(headers):
        table.add_column(
            header,
            justify="left" if header in LEFT_HEADERS else "right",
            width=None if widths is None else widths[j],
            no_wrap=header == NAME_HEADER,
            overflow="fold",  # a figure narrower than its column folds, never ends in "…"
        )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _table_width(out: Console, headers: list[str], widths: list[int]) -> int:
    """The rendered width of a table with these content widths (chrome included)."""
    table = _make_table(headers, [], widths, "")
    unbounded = out.options.update_width(sum(widths) + 1000)  # measured, not clamped to the console
    return Measurement.get(out, unbounded, table).maximum
