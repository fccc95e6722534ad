"""The one exception type for bad input.

Anything the user can fix (a config value, a path, a corpus) raises `UserError` with one
sentence naming the problem and the fix. The CLI prints it without a traceback and exits
with status 2; library callers can catch it.
"""


class UserError(Exception):
  """Bad input that the user can fix; the message says what and how."""
