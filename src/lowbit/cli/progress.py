"""Progress bars on stderr for long CLI work (rich): counts, elapsed time and ETA.

Shown only when stderr is a terminal and --quiet is not given, so logs, pipes and --json
output stay clean. The callbacks match the library's ``progress(what, step, total)`` hooks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .app import stderr

Callback = Callable[[str, int, int], None]


def enabled(quiet: bool) -> bool:
    """Bars only for a person watching: not with --quiet, not when stderr is a file or pipe."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def bars(quiet: bool) -> Iterator[Callable[[str], Callback | None]]:
    """Yield ``bar(title) -> callback`` making one progress bar per phase (None when hidden).

    A callback is called with (what, step, total), ``step`` counting from 0 before the item."""
    if not enabled(quiet):
        yield lambda title: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[what]}"),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:

        def bar(title: str) -> Callback:
            task = progress.add_task(title, total=None, what="")

            def update(what: str, step: int, total: int) -> None:
                progress.update(task, total=total, completed=step, what=what)

            return update

        yield bar
        for task in progress.tasks:  # the hooks report before each item: close the last step
            if task.total:
                progress.update(task.id, completed=task.total, what="done")
