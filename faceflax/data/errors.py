"""Error type for bad input data."""


class DataError(ValueError):
  """Bad or missing input data; the message names the file, row, column or value."""
