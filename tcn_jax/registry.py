"""Name -> object registries, with one "choose one of" error for a bad name.

Every name a config picks (method, chunking, loss, optimizer, ...) is looked
up in a `Registry`, so adding a choice is one `register` call beside its code
and an unknown name is always reported the same way, naming the field.
"""
from typing import Any, Callable

from tcn_jax.errors import TCNError


class Registry:
  """An ordered name -> value map for the choices of one config field.

  Args:
    what: what the names are, for errors ('chunking', 'optimizer').
    field: the config field that picks one ('chunking', 'students.init').
  """

  def __init__(self, what: str, field: str):
    self.what, self.field = what, field
    self._items: dict[str, Any] = {}

  def register(self, name: str, value: Any = None) -> Callable:
    """Registers `value` as `name`; without a value, a decorator."""
    if value is not None:
      self._items[name] = value
      return value

    def decorator(fn):
      self._items[name] = fn
      return fn
    return decorator

  def names(self) -> tuple[str, ...]:
    return tuple(self._items)

  def __contains__(self, name) -> bool:
    return isinstance(name, str) and name in self._items

  def get(self, name: str, field: str | None = None) -> Any:
    """The value registered as `name`; TCNError naming the field if none."""
    if name not in self:
      raise TCNError(f'unknown {self.what} {name!r} (config.'
                     f'{field or self.field}); choose one of '
                     f'{", ".join(map(repr, self._items))}')
    return self._items[name]

  def check(self, name: str, field: str | None = None) -> str:
    """`name` if registered (else the `get` error)."""
    self.get(name, field)
    return name
