"""The demo's calendar and history split (pure); the demo itself runs in `make demo`."""

import datetime as dt

from rtml import demo, pubsub_tools, simulator


def test_the_demo_trains_on_three_weeks_that_end_a_label_delay_week_before_the_streamed_week():
    calendar = demo.windows()
    assert calendar["stream_end"] == demo.START + dt.timedelta(days=demo.DAYS - 1) == dt.date(2026, 3, 31)
    assert calendar["stream_start"] == dt.date(2026, 3, 25)
    assert (calendar["stream_start"] - calendar["train_end"]).days == demo.LABEL_DELAY_DAYS + 1
    assert (calendar["train_end"] - calendar["train_start"]).days + 1 == demo.TRAIN_DAYS


def test_split_history_keeps_publication_order_and_drops_reports_after_the_end(tmp_path):
    history = tmp_path / "h.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=10, customers=40, terminals=80, seed=2), history)
    lines = list(pubsub_tools.read_replay(history))
    cut, end = "2026-01-08T00:00:00Z", "2026-01-11T00:00:00Z"
    before, after = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    counts = demo.split_history(history, cut, end, before, after)
    first, second = list(pubsub_tools.read_replay(before)), list(pubsub_tools.read_replay(after))
    assert counts == (len(first), len(second))
    assert [(line.kind, line.event) for line in first + second] == [
        (line.kind, line.event) for line in lines if line.published_at < end
    ]
    assert all(line.published_at < cut for line in first) and all(cut <= line.published_at < end for line in second)
    assert any(line.published_at >= end for line in lines)  # late reports exist and were left out
