"""The demo's calendar, history split, latency summary and printed summary (pure); the demo itself runs in `make demo`."""

import datetime as dt
import math

from rtml import demo, loadtest, pubsub_tools, simulator


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


def test_steady_state_latency_leaves_out_the_transactions_published_early_in_the_replay():
    start = 1_000_000_000_000
    run = loadtest.StreamRun(replay_started_us=start)
    # Published 0, 10, 20 and 40 s into the replay; the first waited 5 s, the others 100 ms.
    for i, (offset_s, latency_ms) in enumerate([(0, 5000), (10, 100), (20, 100), (40, 100)]):
        published = start + offset_s * 1_000_000
        run.published_at_us[f"t{i}"] = published
        run.outputs[f"t{i}"] = pubsub_tools.PulledMessage(b"", {}, published + latency_ms * 1000)
    assert run.latencies_ms().tolist() == [5000, 100, 100, 100]
    assert run.latencies_ms(after_s=10).tolist() == [100, 100, 100]
    assert run.latency_percentiles(50, 100, after_s=30) == [100.0, 100.0]
    assert run.latency_percentiles(100) == [5000.0]
    assert all(math.isnan(value) for value in run.latency_percentiles(50, after_s=60))


def _simulated(transactions: int) -> simulator.SimulationSummary:
    return simulator.SimulationSummary(transactions, 0, {}, 0.0, "", "", 0.0)


def _summary_inputs(tmp_path, dead_letters: int):
    start = 1_000_000_000_000
    run = loadtest.StreamRun(replay_started_us=start, stats=pubsub_tools.ReplayStats(transactions=3, feedback=1))
    run.stats.malformed["not_json"] = 1
    run.dead_letters["invalid_json"] = dead_letters
    for i, decision in enumerate(["approve", "approve", "decline"]):
        run.published_at_us[f"t{i}"] = start + i * 1_000_000
        run.outputs[f"t{i}"] = pubsub_tools.PulledMessage(f'{{"decision": "{decision}"}}'.encode(), {}, start + i * 1_000_000 + 40_000)
    quality = {"frauds": 1, "auc_roc": 0.91234, "average_precision": None, "card_precision_at_100": 0.07}
    # Paths longer than any terminal's width.
    insights = tmp_path / ("i" * 90) / "insights.jsonl"
    version = tmp_path / ("v" * 90) / "20260101-000000"
    return run, quality, insights, version


def test_the_summary_prints_the_figures_and_both_paths_whole(tmp_path, capsys):
    run, quality, insights, version = _summary_inputs(tmp_path, dead_letters=1)
    simulated = _simulated(104_804)
    assert demo._print_summary(simulated, run, 3, quality, insights, version, 2, None) is True
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"insights: {insights}" in lines
    assert f"model report: {version}/report/summary.md" in lines
    assert "104,804" in out and "0.9123" in out and "n/a" in out and "66.67%" in out
    assert "yes" in out and "NO" not in out


def test_the_summary_says_no_when_a_dead_letter_is_missing(tmp_path, capsys):
    run, quality, insights, version = _summary_inputs(tmp_path, dead_letters=0)
    simulated = _simulated(10)
    assert demo._print_summary(simulated, run, 3, quality, insights, None, 0, None) is False
    out = capsys.readouterr().out
    assert "NO" in out and "model report: -" in out.splitlines()
