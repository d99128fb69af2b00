"""Progress for long steps: a tqdm bar on a terminal, plain log lines otherwise (a log file or a
pipe would get a carriage-return bar mangled into one endless line)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("moeserve.progress")


class PlainProgress:
    """The part of tqdm's interface used here; logs '<desc>: 40% (4/10 unit)' at most every
    ``every_s`` seconds and once at the end."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, total: Optional[float] = None,
                 desc: str = "", unit: str = "it", unit_scale: bool = False,
                 disable: bool = False, every_s: float = 10.0, **_: Any) -> None:
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)   # type: ignore[arg-type]
        self.total, self.n, self.scale = total, 0.0, unit_scale
        self.every_s, self._last, self._start = every_s, time.monotonic(), time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _amount(self, v: float) -> str:
        if self.scale and v >= 1000:
            for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
                if v >= div:
                    return f"{v / div:.1f}{unit}"
        return f"{v:g}"

    def _line(self) -> str:
        done = f"{self._amount(self.n)}/{self._amount(self.total)}" if self.total else self._amount(self.n)
        pct = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        return f"{self.desc}: {pct}({done} {self.unit}, {time.monotonic() - self._start:.0f}s)"

    def update(self, n: float = 1) -> None:
        self.n += n
        finished = self.total is not None and self.n >= self.total  # close() says it, once
        if not self.disable and not finished and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            log.info("%s", self._line())

    def close(self) -> None:
        if not self.disable and self.n:
            log.info("%s done", self._line())
            self.disable = True   # once


def progress(iterable: Optional[Iterable[T]] = None, **kwargs: Any) -> Any:
    """tqdm(iterable, **kwargs) on a terminal; PlainProgress otherwise."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


def quiet_library_bars() -> None:
    """transformers' own bars (GGUF de-quantizing, weight loading) off unless on a terminal:
    in a log file they are carriage-return garbage."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        try:  # its GGUF de-quantizing bar is a bare tqdm.auto: plain lines instead
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
            gguf_utils.tqdm = progress  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            pass
