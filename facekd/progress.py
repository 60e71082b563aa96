"""Progress reporting. The library never prints: long work reports through a `Progress`
object the caller passes in. `NullProgress` is silent; `RichProgress` draws bars (for a
terminal); `PlainProgress` writes timestamped lines (for files, pipes, CI and Slurm logs)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

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


def _info_text(info: dict, sep: str = "  ") -> str:
    return sep.join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


class _RichTask(ProgressTask):
    def __init__(self, owner: "RichProgress", task_id: int):
        self._owner = owner
        self._id = task_id

    def advance(self, n: int = 1, **info: object) -> None:
        text = _info_text(info)
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
    """Progress bars on stderr with rate and ETA (the CLI, when stderr is a terminal)."""

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


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _PlainTask(ProgressTask):
    def __init__(self, owner: "PlainProgress", description: str, total: int | None, unit: str):
        self._owner, self._description, self._total, self._unit = owner, description, total, unit
        self._n, self._info, self._closed = 0, {}, False
        self._start = self._last = owner._clock()
        self._last_n = 0

    def advance(self, n: int = 1, **info: object) -> None:
        self._n += n
        self._info.update(info)
        now = self._owner._clock()
        if now - self._last >= self._owner.interval:
            self._line(now, (self._n - self._last_n) / max(now - self._last, 1e-9), finished=False)
            self._last, self._last_n = now, self._n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            now = self._owner._clock()
            self._line(now, self._n / max(now - self._start, 1e-9), finished=True)

    def _line(self, now: float, rate: float, finished: bool) -> None:
        parts = [self._description]
        if self._total:
            parts.append(f"{self._n}/{self._total} ({100 * self._n // self._total}%)")
        else:
            parts.append(str(self._n))
        parts.append(f"{rate:,.1f} {self._unit}/s" if self._unit else f"{rate:,.1f}/s")
        if finished:
            parts.append(f"done in {_duration(now - self._start)}")
        elif self._total and rate > 0:
            parts.append(f"eta {_duration((self._total - self._n) / rate)}")
        if self._info:
            parts.append(_info_text(self._info, " "))
        self._owner._write(now, "  ".join(parts))


class PlainProgress(Progress):
    """Timestamped lines instead of bars: one per task every `interval` seconds (0: every
    step) and one when it finishes, with n/total, rate, eta and the task's info."""

    def __init__(self, stream: TextIO, interval: float = 15.0, clock: Callable[[], float] = time.time):
        self.stream, self.interval, self._clock = stream, interval, clock
        self._lock = threading.Lock()

    def task(self, description: str, total: int | None = None, unit: str = "") -> ProgressTask:
        return _PlainTask(self, description, total, unit)

    def log(self, message: str) -> None:
        self._write(self._clock(), message)

    def _write(self, now: float, text: str) -> None:
        stamp = datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            self.stream.write(f"{stamp}  {text}\n")
            self.stream.flush()
