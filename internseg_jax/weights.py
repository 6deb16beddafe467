"""Weights: abstract, random and restored variables, and the strict key match.

(Being assembled; see the issue on one home per concept.)
"""
from typing import Mapping, Sequence

from internseg_jax.errors import WeightsError

MAX_LISTED = 40  # problems listed in one error; the rest are counted


def key_problems(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                 *, unexpected: bool = True, describe=lambda key: key) -> list[str]:
  """Every missing, unexpected (if `unexpected`) and mis-shaped key, sorted.

  `expected` and `found` map names to shapes; `describe(key)` renders a key in
  messages (e.g. our path -> the PyTorch name)."""
  out = [f'missing: {describe(k)} {tuple(expected[k])}' for k in sorted(set(expected) - set(found))]
  if unexpected:
    out += [f'unexpected: {describe(k)} {tuple(found[k])}'
            for k in sorted(set(found) - set(expected))]
  out += [f'wrong shape: {describe(k)} is {tuple(found[k])}, expected {tuple(expected[k])}'
          for k in sorted(set(found) & set(expected))
          if tuple(found[k]) != tuple(expected[k])]
  return out


def raise_problems(problems: Sequence[str], what: str, error=WeightsError) -> None:
  """One error listing every problem (MaxText style), or nothing when there are none.
  The first line says what and how many; the problems follow, one per line."""
  if not problems:
    return
  shown = list(problems[:MAX_LISTED])
  if len(problems) > MAX_LISTED:
    shown.append(f'... and {len(problems) - MAX_LISTED} more')
  raise error(f'{what}: {len(problems)} problem(s)\n  ' + '\n  '.join(shown))


def strict_match(expected, found, what: str, error=WeightsError, **kwargs) -> None:
  """Raises `error` naming every missing, unexpected or mis-shaped key."""
  raise_problems(key_problems(expected, found, **kwargs), what, error)
