"""Beam transforms of the training pipeline: select examples by time, split, summarize, encode."""

from __future__ import annotations

from array import array
from typing import NamedTuple

import apache_beam as beam

from models.features import EVENT_TIME, LABEL, RAW_FEATURES
from rtml import drift, examples
from transforms import dofn


class TrainingWindow(NamedTuple):
    """Examples with `start_us <= event_time < end_us`; those from `validation_start_us` on validate."""

    start_us: int
    validation_start_us: int
    end_us: int


class SplitByTimeFn(dofn.DoFn):
    """Serialized example -> (split, serialized, raw feature dict) for examples in the window."""

    TRAIN = "train"
    VALIDATION = "validation"

    def __init__(self, window: TrainingWindow):
        self._window = window

    def process(self, record: bytes):
        example = examples.from_example(record)
        t = example[EVENT_TIME]
        window = self._window
        if not window.start_us <= t < window.end_us:
            return
        raw = {name: example[name] for name in RAW_FEATURES}
        raw[LABEL] = example[LABEL]
        raw[EVENT_TIME] = t
        split = self.VALIDATION if t >= window.validation_start_us else self.TRAIN
        yield beam.pvalue.TaggedOutput(split, (record, raw))


class FeatureStatisticsFn(beam.CombineFn):
    """Raw feature dicts -> `{feature: drift.summarize(values)}` plus example and label counts."""

    def create_accumulator(self):
        return {name: array("d") for name in (*RAW_FEATURES, LABEL)}

    def add_input(self, accumulator, raw):
        for name, values in accumulator.items():
            values.append(raw[name])
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            for name, values in accumulator.items():
                merged[name].extend(values)
        return merged

    def extract_output(self, accumulator):
        labels = accumulator[LABEL]
        if not labels:
            return {"examples": 0, "positives": 0, "features": {}}
        return {
            "examples": len(labels),
            "positives": int(sum(labels)),
            "features": {name: drift.summarize(accumulator[name]) for name in RAW_FEATURES},
        }


class CountLabelsFn(beam.CombineFn):
    """Raw feature dicts -> {"examples": n, "positives": p}."""

    def create_accumulator(self):
        return (0, 0)

    def add_input(self, accumulator, raw):
        return accumulator[0] + 1, accumulator[1] + int(raw[LABEL])

    def merge_accumulators(self, accumulators):
        totals = list(zip(*accumulators, strict=True)) or [(), ()]
        return sum(totals[0]), sum(totals[1])

    def extract_output(self, accumulator):
        return {"examples": accumulator[0], "positives": accumulator[1]}
