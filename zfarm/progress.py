"""Progress bars for long work (rich), shown on stderr so results can be piped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def known_length(*iterables: Iterable[Any]) -> int | None:
    """The number of items ``zip(*iterables)`` yields, if every input knows its length."""
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths) if lengths else None


def track(items: Iterable[T], total: int | None, description: str = "jobs") -> Iterator[T]:
    """Yield ``items`` while a bar shows done/total, rate and time left (count and rate if no total)."""
    from rich.console import Console  # here: rich costs start-up time that only bars need
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn()]
    else:
        columns += [TextColumn("{task.completed} done")]
    columns += [TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")
        for item in items:
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:,.0f}/s" if speed else "")
            yield item
