"""`rtml top`: the health view, its rendering, and a run against the real Pub/Sub emulator."""

import argparse
import json
import re
import time

import pytest
from rich.console import Console

from rtml import config, top

NOW = 1_800_000_000.0  # a fixed wall time (epoch seconds) for rendering


def record(
    version="20261121-093000",
    start="2026-11-21T10:00:00Z",
    end="2026-11-21T10:10:00Z",
    events=1200,
    decisions=(1166, 25, 9),
    latency=(180.0, 950.0),
    psi=None,
    drifted=(),
    precision=(0.1165, 0.5476),
    share=0.9211,
    emitted_at=None,
):
    """A health record following the schema in `rtml.health`."""
    approve, review, decline = decisions
    return {
        "window_start": start,
        "window_end": end,
        "emitted_at": emitted_at or end.replace("Z", ".412Z"),
        "model_version": version,
        "events": events,
        "decisions": {"approve": approve, "review": review, "decline": decline},
        "alert_rate": round((review + decline) / events, 6) if events else None,
        "latency_ms": {"p50": latency[0], "p99": latency[1]},
        "psi": {"amount": 0.012, "score": 0.02} if psi is None else psi,
        "psi_threshold": 0.2,
        "min_events": 200,
        "drifted": list(drifted),
        "labels": {
            "scored": 51234,
            "flagged": {"review": 1030, "decline": 420},
            "reported_frauds": 380,
            "frauds_flagged": {"review": 120, "decline": 230},
            "precision": {"review": precision[0], "decline": precision[1]},
            "fraud_flagged_share": share,
        },
    }


def payload(rec) -> bytes:
    return json.dumps(rec).encode()


def attrs(rec) -> dict:
    return {"model_version": rec["model_version"], "alarm": "drift" if rec["drifted"] else "none"}


def add(view, rec, received_at=NOW - 5):
    return view.add(payload(rec), attrs(rec), received_at=received_at)


def text(view, now=NOW) -> str:
    console = Console(record=True, width=200)
    console.print(top.render(view, now))
    return console.export_text()


def row(output: str, version: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(version)]
    return line


DRIFTED = record(
    version="20261121-093000",
    psi={"amount": 0.41, "customer_avg_amount_1d": 0.27, "score": 0.05},
    drifted=("amount", "customer_avg_amount_1d"),
)


def test_empty_view_says_it_is_waiting():
    output = text(top.HealthView("model-health-sub-x"))
    assert "waiting for health records on model-health-sub-x" in output
    assert "0 records" in output


def test_rows_are_ordered_newest_version_first():
    view = top.HealthView()
    add(view, record(version="20261101-080000"))
    add(view, record(version="20261121-093000"))
    add(view, record(version="20261110-120000"))
    assert view.versions() == ["20261121-093000", "20261110-120000", "20261101-080000"]
    output = text(view)
    positions = [output.index(v) for v in view.versions()]
    assert positions == sorted(positions)
    assert "3 records" in output


def test_row_formats_window_rates_mix_and_latencies():
    view = top.HealthView()
    add(view, record(events=1200, decisions=(1166, 25, 9), latency=(180.0, 950.0)))
    line = row(text(view), "20261121-093000")
    assert "10:00:00-10:10:00" in line
    assert "1,200" in line
    assert "2.00" in line  # 1200 events over 600 s
    assert "97.2/2.1/0.8" in line  # approve/review/decline %
    assert "2.83%" in line  # alert rate
    assert "180/950" in line  # p50/p99 ms
    assert "11.7%/54.8%" in line  # label precision review/decline
    assert "92.1%" in line  # fraud_flagged_share
    assert line.rstrip().endswith("ok")


def test_header_shows_subscription_count_and_last_update():
    view = top.HealthView("model-health-sub")
    add(view, record(), received_at=NOW - 75)
    header = text(view).splitlines()[0]
    assert "model-health-sub" in header
    assert "1 record" in header
    last = time.strftime("%H:%M:%S", time.gmtime(NOW - 75))
    assert f"last update {last}Z (1m15s ago)" in header


def test_nulls_show_as_dashes():
    view = top.HealthView()
    empty = record(events=0, decisions=(0, 0, 0), latency=(None, None), psi={}, precision=(None, None), share=None)
    add(view, empty)
    partial = record(version="20261122-000000", precision=(None, 0.5), share=None)
    add(view, partial)
    cells = re.split(r"\s{2,}", row(text(view), "20261121-093000").strip())
    # version, seen, window, events, ev/s, trend, mix, alerts, latency, precision, share, drift
    assert cells[3] == "0"
    assert cells[6:11] == ["-", "-", "-", "-", "-"]
    assert cells[11] == "n/a (<200 events)"  # no PSI below min_events: neither ok nor drift
    assert "-/50.0%" in row(text(view), "20261122-000000")


def test_drift_column_names_the_drifted_features_with_their_psi_in_red():
    view = top.HealthView()
    add(view, DRIFTED)
    add(view, record(version="20261120-080000"))
    output = text(view)
    assert "amount 0.41, customer_avg_amount_1d 0.27" in row(output, "20261121-093000")
    assert row(output, "20261120-080000").rstrip().endswith("ok")
    alarms = [line for line in output.splitlines() if line.startswith("DRIFT ALARM")]
    assert len(alarms) == 1
    assert "20261121-093000" in alarms[0] and "amount 0.41" in alarms[0] and "PSI >= 0.2" in alarms[0]

    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    console.print(top.drift_text(view.latest("20261121-093000")))
    assert "\x1b[1;31m" in console.export_text(styles=True)  # bold red


def test_alarm_attribute_alone_raises_an_alarm():
    view = top.HealthView()
    rec = record()
    view.add(payload(rec), {"model_version": rec["model_version"], "alarm": "drift"}, received_at=NOW)
    assert [r.model_version for r in view.alarms()] == ["20261121-093000"]


def test_versions_not_heard_from_are_marked_stale():
    view = top.HealthView(staleness_secs=180)
    add(view, record(version="20261121-093000"), received_at=NOW - 10)
    add(view, record(version="20261120-080000"), received_at=NOW - 240)
    output = text(view)
    assert "10s ago" in row(output, "20261121-093000")
    assert "stale" not in row(output, "20261121-093000")
    assert "stale 4m00s" in row(output, "20261120-080000")
    assert not view.is_stale("20261120-080000", NOW - 100)


def test_malformed_messages_are_counted_and_shown():
    view = top.HealthView()
    add(view, record())
    for bad in (b"{not json", b"\xff\xfe{}", b"[1, 2]", b'{"events": 3}', b'{"model_version": 7}', b"null"):
        assert view.add(bad, {}, received_at=NOW) is None
    assert (view.records, view.malformed) == (1, 6)
    header = text(view).splitlines()[0]
    assert "6 malformed" in header
    assert "20261121-093000" in text(view)


def test_fields_of_the_wrong_type_render_as_dashes_instead_of_crashing():
    view = top.HealthView()
    rec = record()
    rec.update(events="many", decisions=[1, 2], latency_ms=None, alert_rate="x", labels=5, psi={"amount": "hi"})
    rec["window_start"] = "yesterday"
    assert view.add(payload(rec), {}, received_at=NOW) is not None
    cells = re.split(r"\s{2,}", row(text(view), "20261121-093000").strip())
    assert cells[2] == "yesterday-2026-11-21T10:10:00Z"  # an unparseable window is shown as it came
    assert cells[3:11] == ["-"] * 8
    assert cells[11] == "n/a (<200 events)"


def test_history_keeps_the_last_records_in_window_order_and_shows_a_trend():
    view = top.HealthView(history=10)
    for minute in range(12):
        start = f"2026-11-21T10:{minute:02d}:00Z"
        end = f"2026-11-21T10:{minute + 10:02d}:00Z"
        add(view, record(start=start, end=end, events=600 * (minute + 1)), received_at=NOW - 60 + minute)
    # a late record for an older window does not replace the latest
    add(view, record(start="2026-11-21T09:50:00Z", end="2026-11-21T10:00:00Z", events=5), received_at=NOW)
    history = view.history("20261121-093000")
    assert len(history) == 10
    assert [r.events for r in history] == [600 * m for m in range(3, 13)]
    assert view.latest("20261121-093000").window_end == "2026-11-21T10:21:00Z"
    assert view.trend("20261121-093000") == [60.0 * m for m in range(3, 13)]
    line = row(text(view), "20261121-093000")
    assert "▁▂▃▃▄▅▆▆▇█" in line
    assert view.records == 13


def test_a_redelivered_record_is_ignored():
    view = top.HealthView()
    assert add(view, record()) is not None
    assert add(view, record()) is None
    assert (view.records, view.duplicates, len(view.history("20261121-093000"))) == (1, 1, 1)


def test_arguments_and_their_checks():
    parser = argparse.ArgumentParser()
    top.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.subscription, args.refresh, args.once, args.idle_timeout) == ("model-health-sub", 1.0, False, None)
    args = parser.parse_args(["--subscription", "s", "--refresh", "0.5", "--once", "--idle-timeout", "3"])
    assert (args.subscription, args.refresh, args.once, args.idle_timeout) == ("s", 0.5, True, 3.0)
    for bad in (["--refresh", "0"], ["--refresh", "-1"], ["--idle-timeout", "0"], ["--refresh", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError):
        top.run(refresh_secs=0)


def health_subscription(unique_topics) -> tuple[str, str]:
    assert config.HEALTH_TOPIC in unique_topics, "config.TOPICS lacks the health topic"
    topic = unique_topics[config.HEALTH_TOPIC]
    return topic, config.subscription_for(topic)


def publish(services, topic, records) -> None:
    """Publish records (dicts, with their attributes) or raw payloads (bytes) to a topic."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    path = config.topic_path(services.project, topic)
    futures = [
        publisher.publish(path, rec) if isinstance(rec, bytes) else publisher.publish(path, payload(rec), **attrs(rec))
        for rec in records
    ]
    for future in futures:
        future.result(timeout=30)
    publisher.stop()


@pytest.mark.emulator
def test_once_shows_what_the_health_subscription_holds(services, unique_topics):
    topic, subscription = health_subscription(unique_topics)
    publish(
        services,
        topic,
        [
            record(version="20261120-080000"),
            record(version="20261121-093000", start="2026-11-21T09:59:00Z", end="2026-11-21T10:09:00Z"),
            DRIFTED,
        ],
    )
    console = Console(record=True, width=200)
    started = time.monotonic()
    shown = top.run(subscription, services.project, once=True, console=console)
    assert shown == 3
    assert time.monotonic() - started < 30
    output = console.export_text()
    assert output.index("20261121-093000") < output.index("20261120-080000")
    assert "amount 0.41, customer_avg_amount_1d 0.27" in row(output, "20261121-093000")
    assert any(line.startswith("DRIFT ALARM  20261121-093000") for line in output.splitlines())
    assert "3 records" in output


@pytest.mark.emulator
def test_live_view_pulls_in_the_background_until_idle(services, unique_topics):
    topic, subscription = health_subscription(unique_topics)
    publish(services, topic, [record(), b"{not json"])
    console = Console(record=True, width=200)
    shown = top.run(subscription, services.project, refresh_secs=0.2, idle_timeout=1.5, console=console)
    assert shown == 1
    output = console.export_text()
    assert "20261121-093000" in output
    assert "1 malformed" in output


@pytest.mark.emulator
def test_a_missing_subscription_is_a_user_error(services):
    args = argparse.Namespace(subscription="no-such-sub", refresh=1.0, once=True, idle_timeout=1.0, stale_after=180.0)
    from rtml.cli import CommandError

    with pytest.raises(CommandError, match="no-such-sub not found"):
        top.main(args, services.project)
