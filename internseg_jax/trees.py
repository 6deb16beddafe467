"""Nested parameter dicts <-> flat {'a/b/c': leaf} dicts."""
import jax


def path_name(path) -> str:
  """A jax tree path -> 'a/b/c'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def flatten(tree) -> dict:
  return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
