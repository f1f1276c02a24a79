"""`rtml retrain`: the training window from the history at hand.

Retraining backfills the history into fresh examples (without touching the serving job's feature
state), trains on the last `days` days whose labels have had time to arrive, and publishes with
the average-precision guard (`beam_pipelines.train --publish_guard`).
"""

from __future__ import annotations

import datetime as dt
import json
import os

from rtml import pubsub_tools

TAIL_BYTES = 1 << 20  # where to look for the last transaction of a plain local replay file


def last_transaction_day(paths: list[str]) -> dt.date:
    """The UTC day of the latest transaction event_time in replay files (publication order).

    Plain local files are read from their last MiB (a transaction is published at its event time,
    so the newest ones are at the end); compressed or remote files are read whole.
    """
    latest = None
    for path in paths:
        found = _tail_latest(path) if _plain_local(path) else None
        if found is None:
            found = _scan_latest(path)
        if found is not None and (latest is None or found > latest):
            latest = found
    if latest is None:
        raise ValueError(f"no transactions in {', '.join(paths)}")
    return dt.date.fromisoformat(latest[:10])


def _plain_local(path: str) -> bool:
    return "://" not in path and not path.endswith(".gz")


def _tail_latest(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        chunk = handle.read().decode("utf-8", errors="replace")
    lines = chunk.splitlines()[1:] if size > TAIL_BYTES else chunk.splitlines()  # the first may be cut
    latest = None
    for text in lines:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        event_time = _transaction_time(record)
        if event_time is not None and (latest is None or event_time > latest):
            latest = event_time
    return latest


def _scan_latest(path: str) -> str | None:
    if "://" in path:
        import io

        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8")
            records = (json.loads(line) for line in text if line.strip())
            times = [t for t in map(_transaction_time, records) if t is not None]
        return max(times, default=None)
    times = [line.event.get("event_time") for line in pubsub_tools.read_replay(path) if line.kind == "transaction"]
    return max((t for t in times if isinstance(t, str)), default=None)


def _transaction_time(record) -> str | None:
    if isinstance(record, dict) and record.get("kind") == "transaction" and isinstance(record.get("event"), dict):
        value = record["event"].get("event_time")
        if isinstance(value, str) and len(value) >= 10:
            return value
    return None


def training_window(last_day: dt.date, days: int, label_delay_days: int) -> tuple[dt.date, dt.date]:
    """`days` days ending `label_delay_days` before `last_day`: transactions whose fraud reports had
    time to arrive (a fraud inside the delay would still look legitimate)."""
    if days < 1:
        raise ValueError("--days must be at least 1")
    if label_delay_days < 0:
        raise ValueError("--label-delay-days must be >= 0")
    end = last_day - dt.timedelta(days=label_delay_days)
    return end - dt.timedelta(days=days - 1), end
