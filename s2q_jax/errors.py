"""Errors the user can fix; the main job prints them as one line, without a traceback."""
import sys


class UserError(Exception):
  """Bad input: the message says what to change."""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """`warnings.showwarning` for the CLIs: one `warning: …` line, without source location."""
  del category, filename, lineno, line
  print(f"warning: {message}", file=file or sys.stderr, flush=True)
