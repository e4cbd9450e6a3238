"""Progress and time left of a long loop: a bar redrawn in place on a terminal, log lines elsewhere.

Calibration runs for hours at real size (one block of CogVideoX takes
minutes per epoch), so it says where it is and when it will end. On a
terminal a single line is redrawn after every unit of work; in a log file
(a batch job, CI, a non-writer process) redrawing would leave garbage, so
plain lines are written instead, at most one every `interval` seconds.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_seconds(seconds: float) -> str:
  """1:02:03, 2:03 or 0:07."""
  seconds = int(round(max(seconds, 0.0)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Progress over `total` units of work, with the time left extrapolated from the rate so far.

  `skip_first` units are left out of the rate once as many later units are
  done: the first block of a calibration also compiles every program, so the
  time it took says little about the blocks after it.
  """

  def __init__(self, total: int, label: str, *, log: Callable[[str], None] = print,
               stream: TextIO | None = None, interval: float = 30.0, skip_first: float = 0.0,
               width: int = 24, clock: Callable[[], float] = time.perf_counter):
    self.total, self.label, self.log = total, label, log
    self.stream = stream if stream is not None else sys.stdout
    self.bar = _isatty(self.stream)
    self.interval, self.skip_first, self.width, self.clock = interval, skip_first, width, clock
    self.start = clock()
    self._skip_done_at: float | None = None  # when the first `skip_first` units were done
    self._last_line = -float("inf")
    self.done = 0.0

  def eta(self) -> float | None:
    """Seconds left, or None before any unit is done."""
    now = self.clock()
    # Without the skipped units once as many again are done: fewer would make the
    # rate of one epoch, slowed by anything at all, stand for the whole run.
    if self._skip_done_at is not None and self.done >= 2 * self.skip_first:
      rate = (now - self._skip_done_at) / (self.done - self.skip_first)
    elif self.done > 0:
      rate = (now - self.start) / self.done
    else:
      return None
    return rate * (self.total - self.done)

  def line(self, note: str = "") -> str:
    eta = self.eta()
    parts = [self.label, f"{100 * self.done / max(self.total, 1):3.0f}%"]
    if self.bar:
      filled = int(self.width * self.done / max(self.total, 1))
      parts.insert(1, "[" + "#" * filled + "." * (self.width - filled) + "]")
    if note:
      parts.append(note)
    parts.append(f"elapsed {format_seconds(self.clock() - self.start)}")
    parts.append("ETA " + (format_seconds(eta) if eta is not None else "?"))
    return "  ".join(parts)

  def update(self, done: float, note: str = "", show: bool = True) -> None:
    """Sets the units done so far and, with `show`, shows them (redrawn, or a throttled
    log line)."""
    self.done = min(done, self.total)
    if self._skip_done_at is None and self.skip_first and self.done >= self.skip_first:
      self._skip_done_at = self.clock()
    if not show:
      return
    if self.bar:
      self.stream.write("\r\x1b[2K" + self.line(note))
      self.stream.flush()
    elif self.clock() - self._last_line >= self.interval:
      self._last_line = self.clock()
      self.log("  " + self.line(note))

  def clear(self) -> None:
    """Removes the bar, so that a log line can be printed in its place."""
    if self.bar:
      self.stream.write("\r\x1b[2K")
      self.stream.flush()


def _isatty(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # closed or not a real file
    return False
