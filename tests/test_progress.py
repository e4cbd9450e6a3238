"""Progress and ETA: a redrawn bar on a terminal, throttled log lines elsewhere, honest ETAs."""
import io

import pytest

from s2q_jax.progress import Progress, format_seconds


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_format_seconds():
  assert [format_seconds(s) for s in (0, 7.4, 63, 3723, -1)] == [
      "0:00", "0:07", "1:03", "1:02:03", "0:00"]


def test_eta_extrapolates_the_rate_without_the_first_block():
  """Block 1 (4 units) took 40 s, compiling; blocks after it take 2 s a unit."""
  clock, lines = Clock(), []
  progress = Progress(12, "calibration", log=lines.append, stream=io.StringIO(),
                      skip_first=4, clock=clock)
  assert progress.eta() is None
  clock.now += 40
  progress.update(4, show=False)
  assert progress.eta() == pytest.approx(40 / 4 * 8)  # nothing better known yet
  clock.now += 2
  progress.update(5, show=False)  # one unit alone is not a rate to trust
  assert progress.eta() == pytest.approx(42 / 5 * 7)
  clock.now += 2 * 3
  progress.update(8, show=False)
  assert progress.eta() == pytest.approx(2 * 4)  # the compiling block no longer counts


def test_log_lines_are_throttled_without_a_terminal():
  clock, lines = Clock(), []
  stream = io.StringIO()
  progress = Progress(10, "calibration", log=lines.append, stream=stream, interval=30,
                      clock=clock)
  for i in range(1, 11):
    clock.now += 10
    progress.update(i, f"epoch {i}/10")
  assert stream.getvalue() == ""  # no control characters in a log file
  assert len(lines) == 4  # at 10 s, then every 30 s: 40, 70, 100
  assert lines[0] == "  calibration   10%  epoch 1/10  elapsed 0:10  ETA 1:30"
  assert lines[-1] == "  calibration  100%  epoch 10/10  elapsed 1:40  ETA 0:00"


def test_bar_is_redrawn_in_place_on_a_terminal():
  clock, lines, tty = Clock(), [], Terminal()
  progress = Progress(4, "calibration", log=lines.append, stream=tty, width=8, clock=clock)
  clock.now += 5
  progress.update(1, "block 1/2 epoch 1/2")
  clock.now += 5
  progress.update(2, "block 1/2 epoch 2/2")
  progress.clear()
  assert lines == []  # the bar replaces the log lines
  frames = tty.getvalue().split("\r\x1b[2K")
  assert frames[1] == "calibration  [##......]   25%  block 1/2 epoch 1/2  elapsed 0:05  ETA 0:15"
  assert frames[2].startswith("calibration  [####....]   50%  block 1/2 epoch 2/2")
  assert frames[-1] == ""  # cleared for the next log line
