"""Errors the user can fix; the main job prints them as one line, without a traceback."""


class UserError(Exception):
  """Bad input: the message says what to change."""
