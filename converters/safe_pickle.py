"""An allow-list unpickler: pickled files are read as data, never run.

Python's pickle resolves every class or function it needs through ``find_class`` (GLOBAL, STACK_GLOBAL,
INST, OBJ and the EXT opcodes all go through it), and PERSID/BINPERSID through ``persistent_load``. This
unpickler answers ``find_class`` only from an explicit table that maps a pickled global's
``module.QualName`` to a stand-in of ours (a stub class that records its arguments and state, or a small
function we wrote). Anything else raises :class:`UnsafePickleError` naming the global, before any of it
could run. There is no fallback to an unrestricted load.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""

    def __init__(self, global_name: str):
        self.global_name = global_name
        super().__init__(f"it asks for the global '{global_name}', which is not on the allow-list")


class PickledObject:
    """Stand-in for an instance of a pickled class: keeps its constructor arguments and state as data.

    Subclasses made by :func:`stub_class` carry the pickled global's name in ``pickled_name``.
    """

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # REDUCE calls the class; NEWOBJ only calls __new__. Either way the arguments are recorded in __new__.
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name} args={self.args!r} state={type(self.state).__name__}>"


def stub_class(pickled_name: str) -> type[PickledObject]:
    """A fresh :class:`PickledObject` subclass standing in for the class ``pickled_name``."""
    short = pickled_name.rsplit(".", 1)[-1]
    return type(short, (PickledObject,), {"pickled_name": pickled_name, "__module__": __name__})


class TypeReference:
    """A pickled reference to a type used as a *value* (e.g. ``object_type=dict`` in omegaconf metadata).

    Not callable: a pickle that tries to call it is refused.
    """

    def __init__(self, pickled_name: str):
        self.pickled_name = pickled_name

    def __repr__(self) -> str:
        return f"<type {self.pickled_name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(self.pickled_name + " (called)")


def pickled_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``: protocols 0-2 pickle ``bytes`` as ``_codecs.encode(str, 'latin1')``;
    any other use is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode (with other arguments than pickle's own bytes encoding)")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only from ``allowed``."""

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[str, Any],
        persistent_load: Callable[[Any], Any] | None = None,
        encoding: str = "utf-8",
    ):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        try:
            return self._allowed[full]
        except KeyError:
            raise UnsafePickleError(full) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError("it holds a persistent reference, which a plain pickle does not")
        return self._persistent_load(pid)


