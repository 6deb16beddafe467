"""The project's own error types.

Each carries a one-line message a person can act on (which file, which key,
what to do). `internseg_jax.main` and `convert.pth_to_orbax` print exactly
these and exit; any other exception is a bug and keeps its traceback.
"""


class InternSegError(Exception):
  """Base of every error the project raises on purpose for bad input."""


class ConfigError(InternSegError, ValueError):
  """A config value that cannot work: names the key and its allowed values."""


class DataError(InternSegError, ValueError):
  """A dataset folder or file that cannot be used; the message names it."""


class ConversionError(InternSegError, ValueError):
  """A weights file that cannot be converted; the message names the file and why."""


class WeightsError(InternSegError, ValueError):
  """A checkpoint that does not exist or does not fit the model."""


class NonFiniteError(InternSegError, FloatingPointError):
  """Training produced a NaN/Inf loss or parameters; the last good checkpoint is kept."""
