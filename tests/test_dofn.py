"""transforms.dofn: Beam reads each DoFn class's method signatures once, and reads the same ones;
`dir` lists the methods with DoFn parameters, and Beam finds the same state and timers."""

import importlib
import inspect
import pkgutil
import types
from unittest import mock

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.runners.common import DoFnSignature
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, get_dofn_specs, on_timer
from apache_beam.transforms.window import GlobalWindow

import beam_pipelines
import transforms
from transforms import dofn


def _methods(fn) -> list[str]:
    """Every method of `fn`, as the default `dir` would list them."""
    return [name for name in object.__dir__(fn) if isinstance(getattr(fn, name, None), types.MethodType)]


def _specs_from_every_method(fn) -> tuple[set, set]:
    """The state and timer specs among the defaults of every method of `fn`."""
    states, timers = set(), set()
    for name in _methods(fn):
        for default in core.get_function_args_defaults(getattr(fn, name))[1]:
            if isinstance(default, core._StateDoFnParam):
                states.add(default.state_spec)
            elif isinstance(default, core._TimerDoFnParam):
                timers.add(default.timer_spec)
    return states, timers


def _project_dofn_classes() -> list[type]:
    for package in (transforms, beam_pipelines):
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    found, todo = [], [dofn.DoFn]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__.startswith(("transforms.", "beam_pipelines."))]


def test_every_dofn_of_the_project_answers_what_beams_inspection_finds():
    classes = _project_dofn_classes()
    names = {cls.__name__ for cls in classes}
    # The streaming path's stateful steps are among them (a guard against finding nothing).
    assert {"CustomerFeaturesFn", "TerminalFeaturesFn", "PublishThenPersistFn", "HealthFn", "LabelJoinFn"} <= names
    for cls in classes:
        fn = cls.__new__(cls)  # signatures belong to the class: no constructor arguments needed
        for name in _methods(fn):
            answered = core.get_function_arguments(fn, name)
            inspected = core.get_function_args_defaults(getattr(fn, name))
            assert answered == inspected, (cls.__name__, name)
            # Listed by `dir` exactly when it takes DoFn parameters.
            takes_parameters = any(isinstance(default, core._DoFnParam) for default in inspected[1])
            assert (name in dir(fn)) == takes_parameters, (cls.__name__, name)
        assert get_dofn_specs(fn) == _specs_from_every_method(fn), cls.__name__


class _Counter(dofn.DoFn):
    COUNT = BagStateSpec("count", VarIntCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def process(self, element, count=beam.DoFn.StateParam(COUNT), flush=beam.DoFn.TimerParam(FLUSH)):
        yield element

    @on_timer(FLUSH)
    def on_flush(self, count=beam.DoFn.StateParam(COUNT)):
        return []


class _PlainCounter(beam.DoFn):
    COUNT = _Counter.COUNT
    FLUSH = _Counter.FLUSH

    process = _Counter.process
    on_flush = _Counter.on_flush


def test_state_and_timers_are_found_as_beam_finds_them_on_a_plain_dofn():
    assert get_dofn_specs(_Counter()) == get_dofn_specs(_PlainCounter()) == ({_Counter.COUNT}, {_Counter.FLUSH})
    ours, plain = DoFnSignature(_Counter()), DoFnSignature(_PlainCounter())
    assert ours.is_stateful_dofn() and plain.is_stateful_dofn()
    assert (ours.process_method.args, ours.process_method.defaults) == (
        plain.process_method.args,
        plain.process_method.defaults,
    )
    assert ours.timer_methods.keys() == plain.timer_methods.keys() == {_Counter.FLUSH}


def test_dir_lists_the_methods_with_dofn_parameters_only():
    class WithHelpers(_Counter):
        def helper(self, value):
            return value

        def start_bundle(self):
            pass

        def finish_bundle(self, window=beam.DoFn.WindowParam):
            return []

    fn = WithHelpers()
    assert dir(fn) == ["finish_bundle", "on_flush", "process"]
    assert dir(fn) is not dir(fn)  # a fresh list each time: no caller can change the cached one
    assert get_dofn_specs(fn) == _specs_from_every_method(fn) == ({_Counter.COUNT}, {_Counter.FLUSH})
    assert set(dir(_PlainCounter())) > set(dir(fn))  # a plain DoFn lists everything


def test_a_stateful_dofn_with_a_timer_runs_as_on_a_plain_dofn():
    class Buffered(dofn.DoFn):
        SEEN = BagStateSpec("seen", VarIntCoder())
        FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

        def process(self, element, seen=beam.DoFn.StateParam(SEEN), flush=beam.DoFn.TimerParam(FLUSH)):
            seen.add(element[1])
            flush.set(GlobalWindow().max_timestamp())

        @on_timer(FLUSH)
        def on_flush(self, key=beam.DoFn.KeyParam, seen=beam.DoFn.StateParam(SEEN)):
            yield key, sorted(seen.read())

    with TestPipeline(runner="FnApiRunner") as pipeline:
        flushed = pipeline | beam.Create([("a", 2), ("b", 5), ("a", 1)]) | beam.ParDo(Buffered())
        assert_that(flushed, equal_to([("a", [1, 2]), ("b", [5])]))


def test_each_class_is_inspected_once_whatever_the_number_of_bundles():
    class Fresh(dofn.DoFn):
        def process(self, element, timestamp=beam.DoFn.TimestampParam):
            yield element

    real = core.get_function_args_defaults
    with mock.patch.object(core, "get_function_args_defaults", side_effect=real) as inspected:
        get_dofn_specs(Fresh())
        first = inspected.call_count
        for _ in range(5):  # the runner's DoFnRunner per bundle
            DoFnSignature(Fresh())
            get_dofn_specs(Fresh())
        again = inspected.call_count - first
    # The first time: the class's functions, for `dir`, and then its listed method's signature.
    functions = [getattr(Fresh, name) for name in dir(Fresh)]  # `dir` of the class, not of an instance
    assert first == len(dir(Fresh())) + sum(inspect.isfunction(f) or inspect.ismethod(f) for f in functions), first
    # Only what Beam inspects without asking the DoFn (the process method's batching checks).
    assert again <= 5 * 2, again
    # The same loop over a plain DoFn inspects every method every time.
    with mock.patch.object(core, "get_function_args_defaults", side_effect=real) as inspected:
        for _ in range(5):
            get_dofn_specs(_PlainCounter())
    assert inspected.call_count == 5 * len(_methods(_PlainCounter()))


def test_a_subclass_is_inspected_for_itself():
    class Parent(dofn.DoFn):
        def process(self, element, timestamp=beam.DoFn.TimestampParam):
            yield element

    class Child(Parent):
        def process(self, element, window=beam.DoFn.WindowParam):
            yield element

    assert Parent()._inspect_process() == (["element", "timestamp"], [beam.DoFn.TimestampParam])
    assert Child()._inspect_process() == (["element", "window"], [beam.DoFn.WindowParam])


def test_answers_are_fresh_lists_and_missing_methods_stay_missing():
    fn = _Counter()
    args, defaults = fn._inspect_process()
    args.append("changed")
    defaults.clear()
    assert fn._inspect_process() == core.get_function_args_defaults(fn.process)
    assert not hasattr(fn, "_inspect_no_such_method")
    assert not hasattr(fn, "no_such_attribute")
    assert inspect.signature(fn.process).parameters.keys() == {"element", "count", "flush"}


def test_map_and_flat_map_run_like_beams():
    with TestPipeline(runner="FnApiRunner") as pipeline:
        numbers = pipeline | beam.Create([1, 2, 3])
        assert_that(numbers | "Map" >> dofn.Map(lambda n: n * 10), equal_to([10, 20, 30]), label="Mapped")
        assert_that(
            numbers | "FlatMap" >> dofn.FlatMap(lambda n: [n] * n), equal_to([1, 2, 2, 3, 3, 3]), label="FlatMapped"
        )


def test_map_refuses_a_function_that_asks_for_dofn_parameters():
    def stamped(element, timestamp=beam.DoFn.TimestampParam):
        return element, timestamp

    with pytest.raises(TypeError, match="DoFn parameters"):
        dofn.Map(stamped)
    with pytest.raises(TypeError, match="DoFn parameters"):
        dofn.FlatMap(stamped)
