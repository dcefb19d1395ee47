"""The library's one exception type: bad input that a user can fix, with a message naming the problem."""


class GemmaError(ValueError):
  """Raised for bad user input (paths, files, shapes, tokens, arguments).

  The CLIs print its message without a traceback. It subclasses ValueError so callers that
  already catch ValueError keep working.
  """
