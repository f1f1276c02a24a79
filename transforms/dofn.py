"""`DoFn`: a `beam.DoFn` whose method signatures Beam reads once per class, not once per bundle.

Before each bundle a runner builds its `DoFnRunner`, and the local runner does so for every
step on every wave of input: Beam then lists the DoFn's arguments by inspecting every method
it has (`userstate.get_dofn_specs`, which looks for state and timer parameters), about 30
methods, several times per bundle. In a streaming pipeline on the local runner that was the
largest single cost of the worker thread (BENCHMARKS.md). This class cuts it twice:

- Beam asks the DoFn first: `core.get_function_arguments(dofn, name)` returns
  `dofn._inspect_<name>()` when the DoFn has one (Beam's own wrappers of plain callables use
  this to describe the callable they wrap). This class answers it for every method from a cache
  kept per class, filled by Beam's own inspection the first time, so Beam sees exactly the
  arguments it would have found.
- `get_dofn_specs` walks `dir(dofn)`, Beam's only use of `dir` on a DoFn, and wraps every method
  it lists; a method without DoFn parameters (state, timers, timestamp, window, ...) adds
  nothing to its answer. So `dir()` of this class lists only the methods with DoFn parameters
  (computed once per class), and the walk gives the same state and timer specs for a fraction of
  the cost (about 8 instead of 118 us for the terminal feature step).

A method's signature must not vary between instances of one class (no instance attribute may
stand in for a method), which holds for every DoFn of the project.
"""

import inspect

import apache_beam as beam
from apache_beam.transforms import core

_PREFIX = "_inspect_"
_SIGNATURES: dict[tuple[type, str], tuple[list, list]] = {}
_LISTED: dict[type, list[str]] = {}


def _with_dofn_parameters(cls: type) -> list[str]:
    """The names of `cls`'s methods that take DoFn parameters, sorted as `dir` sorts."""
    listed = []
    for name in dir(cls):  # the class's own listing: instances answer `dir` with this function
        method = getattr(cls, name, None)
        if not (inspect.isfunction(method) or inspect.ismethod(method)):
            continue
        _, defaults = core.get_function_args_defaults(method)
        if any(isinstance(default, core._DoFnParam) for default in defaults):
            listed.append(name)
    return listed


class DoFn(beam.DoFn):
    def __dir__(self):
        cls = type(self)
        listed = _LISTED.get(cls)
        if listed is None:  # two threads may both compute it first: they store the same list
            listed = _LISTED[cls] = _with_dofn_parameters(cls)
        return list(listed)

    def __getattr__(self, name: str):
        # Called only for attributes the object lacks: the `_inspect_*` answers (and misses).
        if not name.startswith(_PREFIX):
            raise AttributeError(name)
        method_name = name[len(_PREFIX) :]
        key = (type(self), method_name)
        found = _SIGNATURES.get(key)
        if found is None:
            # Beam's inspection of the method; AttributeError (hence "no answer") if there is none.
            # Two threads may both inspect a class first: they store the same answer.
            found = _SIGNATURES[key] = core.get_function_args_defaults(getattr(self, method_name))
        args, defaults = found
        # Fresh lists each time, as inspection would give: no caller can change the cached ones.
        return lambda: (list(args), list(defaults))


class _MapFn(DoFn):
    def __init__(self, fn, flat: bool):
        self._fn = fn
        self._flat = flat

    def process(self, element):
        if self._flat:
            yield from self._fn(element)
        else:
            yield self._fn(element)


def _element_only(fn):
    _, defaults = core.get_function_args_defaults(fn)
    if any(isinstance(default, core._DoFnParam) for default in defaults):
        raise TypeError(f"{fn!r} asks for DoFn parameters (timestamp, window, ...): use beam.Map or a DoFn")
    return fn


def Map(fn) -> beam.ParDo:  # noqa: N802 (named like beam.Map, which it stands in for)
    """`beam.Map(fn)` with the signature cache of `DoFn`; `fn` takes the element alone."""
    return beam.ParDo(_MapFn(_element_only(fn), flat=False))


def FlatMap(fn) -> beam.ParDo:  # noqa: N802 (named like beam.FlatMap)
    """`beam.FlatMap(fn)` with the signature cache of `DoFn`; `fn` takes the element alone."""
    return beam.ParDo(_MapFn(_element_only(fn), flat=True))
