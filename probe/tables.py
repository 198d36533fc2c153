"""Print rich tables whole at any width: no cell is ever cut to "…".

Rich shrinks a table that is wider than the console by wrapping and then truncating cells, so a
10-column table piped to a file (80 columns) shows "meth…" and "stat…". `fit_table(table)`
wraps a `rich.table.Table` in a renderable that picks, at print time, the first layout that fits
the width it is given, with every cell whole:

1. the table as built;
2. the same table with a light box (no vertical rules, header underlined);
3. transposed: one column per row, headed by the row's first cell (a method or policy name);
4. one block per row: "header  value" lines, long values folded onto more lines.

>>> from rich.console import Console
>>> from rich.table import Table
>>> table = Table("method", "status", "layer us", "replicas", "moved MB", "solve time")
>>> table.add_row("greedy_ref", "time_limit", "559.5", "10", "498", "41.2 ms")
>>> console = Console(width=40, color_system=None)
>>> console.print(fit_table(table))
method       greedy_ref
───────────────────────
status       time_limit
layer us          559.5
replicas             10
moved MB            498
solve time      41.2 ms
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["fit_table"]


def _header(column) -> RenderableType:
    header = column.header
    return header.replace("\n", " ") if isinstance(header, str) else header


def _rows(table: Table) -> list[list[RenderableType]]:
    columns = [list(c.cells) for c in table.columns]
    return [list(row) for row in zip(*columns, strict=True)] if columns else []


def _light(table: Table) -> Table:
    """`table` again with a light box (same columns, cells and title)."""
    out = Table(title=table.title, caption=table.caption, box=box.SIMPLE_HEAD,
                show_header=table.show_header, show_edge=False, pad_edge=False,
                header_style=table.header_style, title_style=table.title_style)
    for column in table.columns:
        out.add_column(column.header, justify=column.justify, style=column.style,
                       header_style=column.header_style, no_wrap=True)
    for row, style in zip(_rows(table), _row_styles(table), strict=True):
        out.add_row(*row, style=style)
    return out


def _row_styles(table: Table) -> list:
    return [row.style for row in table.rows]


def _transposed(table: Table) -> Table:
    """One column per row of `table`, headed by the row's first cell."""
    rows = _rows(table)
    out = Table(title=table.title, caption=table.caption, box=box.SIMPLE_HEAD,
                show_edge=False, pad_edge=False, title_style=table.title_style)
    first = table.columns[0]
    out.add_column(_header(first), style="bold", no_wrap=True)
    for row in rows:
        out.add_column(row[0], justify="right", no_wrap=True)
    for i, column in enumerate(table.columns[1:], start=1):
        out.add_row(_header(column), *(row[i] for row in rows))
    return out


def _blocks(table: Table) -> Group:
    """One small "header  value" grid per row; values fold rather than get cut."""
    parts: list[RenderableType] = []
    if table.title:
        parts.append(Text(str(table.title), style="italic"))
    for row in _rows(table):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for column, cell in zip(table.columns, row, strict=True):
            grid.add_row(_header(column), cell)
        parts += [grid, Text("")]
    return Group(*parts)


@dataclass(frozen=True)
class _Fitted:
    table: Table

    def _layouts(self) -> Iterator[RenderableType]:
        for column in self.table.columns:
            column.no_wrap = True  # a cell that does not fit must move the layout, not shrink
        yield self.table
        yield _light(self.table)
        if self.table.columns and self.table.show_header:
            yield _transposed(self.table)

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        wide = options.update_width(1 << 16)
        for layout in self._layouts():
            # Every column is no_wrap: the layout needs its natural (widest) width.
            if Measurement.get(console, wide, layout).maximum <= options.max_width:
                yield layout
                return
        yield _blocks(self.table)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)


def fit_table(table: Table) -> RenderableType:
    """A renderable that prints `table` in the first layout that fits, no cell cut (see the
    module docstring). The table's columns are set to no_wrap."""
    if not isinstance(table, Table):
        raise TypeError(f"table must be a rich.table.Table, got {type(table).__name__}")
    return _Fitted(table)
