"""Progress reporting. The library never prints: long work reports through a `Progress`
object the caller passes in. `NullProgress` is silent; `RichProgress` draws bars."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class ProgressTask:
    """One bar. `advance` moves it; keyword `info` (e.g. loss=0.3) is shown beside it."""

    def advance(self, n: int = 1, **info: object) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "ProgressTask":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Silent reporter; subclass to display. Also the interface every reporter follows."""

    def task(self, description: str, total: int | None = None, unit: str = "") -> ProgressTask:
        """A bar of `total` steps (None: unknown); `unit` names a step in the rate ("img": img/s)."""
        return ProgressTask()

    def log(self, message: str) -> None:
        pass

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.task(description, total) as bar:
            for item in items:
                yield item
                bar.advance()


NullProgress = Progress


class _RichTask(ProgressTask):
    def __init__(self, owner: "RichProgress", task_id: int):
        self._owner = owner
        self._id = task_id

    def advance(self, n: int = 1, **info: object) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self._owner._bars.update(self._id, advance=n, info=text)

    def close(self) -> None:
        self._owner._close(self._id)


def _rate_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "")
            text = "" if speed is None else f"{speed:,.1f} {unit}/s" if unit else f"{speed:,.1f}/s"
            return Text(text, style="progress.data.speed")

    return RateColumn


class RichProgress(Progress):
    """Progress bars on stderr with rate and ETA (used by the CLI)."""

    def __init__(self, console=None, disable: bool = False):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as _Bars, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        _RateColumn = _rate_column_class()
        self._console = console or Console(stderr=True)
        self._bars = _Bars(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self._console, disable=disable, transient=False,
        )
        self._open = 0

    def task(self, description: str, total: int | None = None, unit: str = "") -> ProgressTask:
        if self._open == 0:
            self._bars.start()
        self._open += 1
        return _RichTask(self, self._bars.add_task(description, total=total, info="", unit=unit))

    def _close(self, task_id: int) -> None:
        self._bars.stop_task(task_id)
        self._open -= 1
        if self._open == 0:
            self._bars.stop()

    def log(self, message: str) -> None:
        self._console.print(message)
