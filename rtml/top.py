"""`rtml top`: a live terminal view of the model-health topic.

The scoring pipeline publishes one health record per model version every minute (schema in
`rtml.health`). `HealthView` keeps the latest record of each version, when it arrived and a short
history; `render` turns a view into a rich renderable; `run` pulls the subscription in a
background thread and redraws in place until Ctrl-C (or, with `once`, prints a single frame).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rtml import config

DEFAULT_SUBSCRIPTION = config.subscription_for(config.HEALTH_TOPIC)
DEFAULT_STALENESS_SECS = 180.0
DEFAULT_HISTORY = 10
DEFAULT_IDLE_TIMEOUT_SECS = 2.0
FLAGGED = ("review", "decline")
DECISIONS = ("approve", *FLAGGED)

# How long one pull waits at most: short, so the pulling thread notices a stop request promptly.
PULL_TIMEOUT_SECS = 1.0
PULL_BATCH = 100
SPARK = "▁▂▃▄▅▆▇█"


class TopError(RuntimeError):
    """A failure the user can act on (e.g. the subscription does not exist)."""


class MalformedRecord(ValueError):
    """A message that is not a health record: not UTF-8 JSON, not an object, or no model version."""


@dataclass(frozen=True)
class HealthRecord:
    """The fields of a health record `rtml top` shows; a field of the wrong type reads as None."""

    model_version: str
    window_start: str
    window_end: str
    emitted_at: str | None
    events: int | None
    decisions: dict[str, int]
    alert_rate: float | None
    latency_p50: float | None
    latency_p99: float | None
    psi: dict[str, float]
    psi_threshold: float | None
    min_events: int | None
    drifted: tuple[str, ...]
    precision: dict[str, float | None]
    fraud_flagged_share: float | None
    alarm: str  # "drift" or "none"

    @property
    def window_secs(self) -> float | None:
        start, end = _parse_time(self.window_start), _parse_time(self.window_end)
        if start is None or end is None or end <= start:
            return None
        return (end - start).total_seconds()

    @property
    def events_per_sec(self) -> float | None:
        secs = self.window_secs
        return None if self.events is None or secs is None else self.events / secs

    @property
    def events_per_min(self) -> float | None:
        rate = self.events_per_sec
        return None if rate is None else rate * 60.0

    @property
    def drifting(self) -> bool:
        return bool(self.drifted) or self.alarm == "drift"

    @property
    def order_key(self) -> tuple[float, str]:
        """Orders a version's records by the end of their window (text order when unparseable)."""
        end = _parse_time(self.window_end)
        return (end.timestamp() if end is not None else float("-inf"), self.window_end)


def parse_record(data: bytes | str | Mapping, attributes: Mapping[str, str] | None = None) -> HealthRecord:
    """A health record from a message payload; raises `MalformedRecord` when it is not one."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise MalformedRecord(f"not UTF-8: {err}") from None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError as err:
            raise MalformedRecord(f"not JSON: {err}") from None
    if not isinstance(data, Mapping):
        raise MalformedRecord(f"not a JSON object but {type(data).__name__}")
    version = data.get("model_version")
    if not isinstance(version, str) or not version:
        raise MalformedRecord("no model_version")
    attributes = attributes or {}
    latency = _mapping(data.get("latency_ms"))
    labels = _mapping(data.get("labels"))
    precision = _mapping(labels.get("precision"))
    psi = {str(k): v for k, v in _mapping(data.get("psi")).items() if _number(v) is not None}
    drifted = data.get("drifted")
    drifted = tuple(str(name) for name in drifted) if isinstance(drifted, list) else ()
    alarm = attributes.get("alarm") or ("drift" if drifted else "none")
    return HealthRecord(
        model_version=version,
        window_start=str(data.get("window_start", "")),
        window_end=str(data.get("window_end", "")),
        emitted_at=data.get("emitted_at") if isinstance(data.get("emitted_at"), str) else None,
        events=_count(data.get("events")),
        decisions={name: n for name, n in _mapping(data.get("decisions")).items() if _count(n) is not None},
        alert_rate=_number(data.get("alert_rate")),
        latency_p50=_number(latency.get("p50")),
        latency_p99=_number(latency.get("p99")),
        psi={name: float(value) for name, value in psi.items()},
        psi_threshold=_number(data.get("psi_threshold")),
        min_events=_count(data.get("min_events")),
        drifted=drifted,
        precision={d: _number(precision.get(d)) for d in FLAGGED},
        fraud_flagged_share=_number(labels.get("fraud_flagged_share")),
        alarm=alarm,
    )


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass
class _Version:
    history: list[HealthRecord] = field(default_factory=list)  # oldest window first
    last_seen: float = 0.0  # wall time (epoch seconds) of the latest arrival


class HealthView:
    """The latest health record of every model version, when it arrived, and a short history.

    Thread safe: the pulling thread calls `add`, the drawing thread reads under `lock`.
    """

    def __init__(
        self,
        subscription: str = DEFAULT_SUBSCRIPTION,
        staleness_secs: float = DEFAULT_STALENESS_SECS,
        history: int = DEFAULT_HISTORY,
    ):
        if staleness_secs <= 0:
            raise ValueError("staleness_secs must be > 0")
        if history < 1:
            raise ValueError("history must be >= 1")
        self.subscription = subscription
        self.staleness_secs = staleness_secs
        self.history_size = history
        self.lock = threading.RLock()
        self.records = 0  # health records accepted
        self.malformed = 0  # messages that were not health records
        self.duplicates = 0  # redeliveries of a record already held (ignored)
        self.last_update: float | None = None  # wall time of the latest accepted record
        self.error: str | None = None  # the latest pull error, cleared by the next good pull
        self._versions: dict[str, _Version] = {}

    def add(
        self, data: bytes | str | Mapping, attributes: Mapping[str, str] | None = None, received_at: float | None = None
    ) -> HealthRecord | None:
        """Take one message; returns its record, or None when it was malformed or a redelivery."""
        received_at = time.time() if received_at is None else received_at
        with self.lock:
            try:
                record = parse_record(data, attributes)
            except MalformedRecord:
                self.malformed += 1
                return None
            entry = self._versions.setdefault(record.model_version, _Version())
            if any(r.window_end == record.window_end and r.emitted_at == record.emitted_at for r in entry.history):
                self.duplicates += 1
                return None
            keys = [r.order_key for r in entry.history]
            entry.history.insert(bisect.bisect_right(keys, record.order_key), record)
            del entry.history[: -self.history_size]
            entry.last_seen = max(entry.last_seen, received_at)
            self.records += 1
            self.last_update = received_at if self.last_update is None else max(self.last_update, received_at)
            return record

    def add_message(self, message: Any, received_at: float | None = None) -> HealthRecord | None:
        """Take a `pubsub_tools.PulledMessage` (or anything with `data` and `attributes`)."""
        return self.add(message.data, dict(message.attributes or {}), received_at)

    def versions(self) -> list[str]:
        """Model versions heard from, newest first (version names sort by their UTC creation time)."""
        with self.lock:
            return sorted(self._versions, reverse=True)

    def latest(self, version: str) -> HealthRecord:
        with self.lock:
            return self._versions[version].history[-1]

    def history(self, version: str) -> list[HealthRecord]:
        with self.lock:
            return list(self._versions[version].history)

    def last_seen(self, version: str) -> float:
        with self.lock:
            return self._versions[version].last_seen

    def trend(self, version: str) -> list[float]:
        """Events per minute of the version's recent windows, oldest first."""
        return [rate for rate in (r.events_per_min for r in self.history(version)) if rate is not None]

    def is_stale(self, version: str, now: float) -> bool:
        return now - self.last_seen(version) > self.staleness_secs

    def alarms(self) -> list[HealthRecord]:
        """The latest record of each version whose drift alarm is on, newest version first."""
        return [record for record in (self.latest(v) for v in self.versions()) if record.drifting]


# Rendering


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%H:%M:%SZ")


def _window(record: HealthRecord) -> str:
    start, end = _parse_time(record.window_start), _parse_time(record.window_end)
    if start is None or end is None:
        return f"{record.window_start or '?'}-{record.window_end or '?'}"
    return f"{start.astimezone(dt.UTC):%H:%M:%S}-{end.astimezone(dt.UTC):%H:%M:%S}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _mix(record: HealthRecord) -> str:
    total = sum(record.decisions.get(d, 0) for d in DECISIONS)
    if not total:
        return "-"
    return "/".join(f"{record.decisions.get(d, 0) / total * 100:.1f}" for d in DECISIONS)


def _latency(record: HealthRecord) -> str:
    if record.latency_p50 is None and record.latency_p99 is None:
        return "-"
    return f"{_ms(record.latency_p50)}/{_ms(record.latency_p99)}"


def _precision(record: HealthRecord) -> str:
    values = [record.precision.get(d) for d in FLAGGED]
    return "-" if all(v is None for v in values) else "/".join(_pct(v) for v in values)


def _sparkline(values: list[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span == 0:
        return SPARK[len(SPARK) // 2] * len(values)
    return "".join(SPARK[round((v - low) / span * (len(SPARK) - 1))] for v in values)


def _trend(view: HealthView, version: str) -> str:
    return _sparkline(view.trend(version)) or "-"


def drift_text(record: HealthRecord):
    """`ok`, or the drifted features with their PSI (red); `n/a` when PSI was not computed."""
    from rich.text import Text

    if record.drifting:
        names = record.drifted or ("(features not named)",)
        parts = [f"{name} {record.psi[name]:.2f}" if name in record.psi else name for name in names]
        return Text(", ".join(parts), style="bold red")
    if not record.psi:
        below = f" (<{record.min_events} events)" if record.min_events is not None else ""
        return Text(f"n/a{below}", style="dim")
    return Text("ok", style="green")


def render(view: HealthView, now: float):
    """One frame: a header line, a table with one row per model version, then the drift alarms."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    with view.lock:
        header = Text()
        header.append("rtml top", style="bold")
        header.append(f"  {view.subscription}  ·  {view.records:,} record{'s' if view.records != 1 else ''}")
        if view.last_update is not None:
            header.append(f"  ·  last update {_clock(view.last_update)} ({_ago(now - view.last_update)} ago)")
        if view.malformed:
            header.append(f"  ·  {view.malformed:,} malformed", style="bold red")
        if view.error:
            header.append(f"  ·  pull error: {view.error}", style="yellow")
        versions = view.versions()
        if not versions:
            waiting = Text(f"waiting for health records on {view.subscription} ...", style="dim")
            return Group(header, waiting)

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False, header_style="bold")
        table.add_column("version", no_wrap=True)
        table.add_column("seen", no_wrap=True)
        table.add_column("window (UTC)", no_wrap=True)
        for name in ("events", "ev/s", "trend ev/min", "appr/rev/decl %", "alerts", "p50/p99 ms", "prec rev/dec"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("fraud flagged", justify="right", no_wrap=True)
        table.add_column("drift (PSI)", overflow="fold")
        for version in versions:
            record = view.latest(version)
            age = now - view.last_seen(version)
            stale = view.is_stale(version, now)
            seen = Text(f"stale {_ago(age)}", style="yellow") if stale else Text(f"{_ago(age)} ago")
            table.add_row(
                Text(version, style="dim" if stale else "bold"),
                seen,
                _window(record),
                "-" if record.events is None else f"{record.events:,}",
                _rate(record.events_per_sec),
                _trend(view, version),
                _mix(record),
                _pct(record.alert_rate, 2),
                _latency(record),
                _precision(record),
                _pct(record.fraud_flagged_share),
                drift_text(record),
                style="dim" if stale else None,
            )

        lines: list = [header, table]
        for record in view.alarms():
            line = Text()
            line.append("DRIFT ALARM", style="bold red")
            line.append(f"  {record.model_version}: ")
            line.append_text(drift_text(record))
            threshold = f"PSI >= {record.psi_threshold:g}, " if record.psi_threshold is not None else ""
            line.append(f"  ({threshold}window {_window(record)})")
            if view.is_stale(record.model_version, now):
                line.append("  [stale]", style="yellow")
            lines.append(line)
        return Group(*lines)


# Pulling


class _Puller:
    """Pulls a subscription into a view with short deadlines, so that a stop request is seen fast."""

    def __init__(self, subscription: str, project: str, view: HealthView):
        from google.cloud import pubsub_v1

        self.path = config.resolve_subscription(project, subscription)
        self.view = view
        self.client = pubsub_v1.SubscriberClient()

    def pull(self, timeout: float = PULL_TIMEOUT_SECS) -> int:
        """One pull; returns how many messages came (0 on a timeout or a transient error)."""
        from google.api_core import exceptions

        try:
            response = self.client.pull(
                request={"subscription": self.path, "max_messages": PULL_BATCH}, timeout=timeout, retry=None
            )
        except exceptions.NotFound:
            raise TopError(
                f"subscription {self.path} not found (`rtml up` creates {DEFAULT_SUBSCRIPTION}; or pass --subscription)"
            ) from None
        except exceptions.DeadlineExceeded:
            self.view.error = None
            return 0
        except exceptions.GoogleAPICallError as err:
            self.view.error = f"{type(err).__name__}: {getattr(err, 'message', err)}"
            time.sleep(min(timeout, 0.5))
            return 0
        self.view.error = None
        received = list(response.received_messages)
        for item in received:
            self.view.add(item.message.data, dict(item.message.attributes))
        if received:
            try:
                self.client.acknowledge(request={"subscription": self.path, "ack_ids": [m.ack_id for m in received]})
            except exceptions.GoogleAPICallError:
                pass  # redelivered later; the view ignores records it already holds
        return len(received)

    def close(self) -> None:
        self.client.close()


def _pull_until_idle(puller: _Puller, idle_timeout: float, stop: threading.Event | None = None) -> None:
    last = time.monotonic()
    while stop is None or not stop.is_set():
        if puller.pull(timeout=min(PULL_TIMEOUT_SECS, max(idle_timeout, 0.1))):
            last = time.monotonic()
        elif time.monotonic() - last >= idle_timeout:
            return
        else:
            time.sleep(0.05)


def run(
    subscription: str = DEFAULT_SUBSCRIPTION,
    project: str = config.DEFAULT_PROJECT,
    refresh_secs: float = 1.0,
    once: bool = False,
    idle_timeout: float | None = None,
    console=None,
    staleness_secs: float = DEFAULT_STALENESS_SECS,
) -> int:
    """Show the health records of `subscription` until Ctrl-C; returns how many records were shown.

    With `once`, pull what the subscription holds until no message came for `idle_timeout`
    (default 2 s), print one frame and return. Without it, redraw every `refresh_secs` seconds
    and, when `idle_timeout` is given, stop after that long without a message.
    """
    from rich.console import Console
    from rich.live import Live

    if refresh_secs <= 0:
        raise ValueError("refresh_secs must be > 0")
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError("idle_timeout must be > 0")
    console = console or Console()
    view = HealthView(subscription, staleness_secs=staleness_secs)
    puller = _Puller(subscription, project, view)

    if once:
        try:
            _pull_until_idle(puller, DEFAULT_IDLE_TIMEOUT_SECS if idle_timeout is None else idle_timeout)
        except KeyboardInterrupt:
            pass
        finally:
            puller.close()
        console.print(render(view, time.time()))
        return view.records

    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if idle_timeout is None:
                while not stop.is_set():
                    if not puller.pull():
                        time.sleep(0.05)
            else:
                _pull_until_idle(puller, idle_timeout, stop)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            failure.append(err)
        finally:
            puller.close()

    thread = threading.Thread(target=work, name="rtml-top-pull", daemon=True)
    thread.start()
    try:
        with Live(
            get_renderable=lambda: render(view, time.time()),
            console=console,
            refresh_per_second=1.0 / refresh_secs,
        ) as live:
            while thread.is_alive():
                thread.join(0.1)
            live.refresh()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join(PULL_TIMEOUT_SECS + 1.0)
    if failure:
        raise failure[0]
    return view.records


# Command line


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rtml top` options (the services and cloud options come from the parent parsers)."""
    parser.add_argument(
        "--subscription", default=DEFAULT_SUBSCRIPTION, help="health subscription to read (default: %(default)s)"
    )
    parser.add_argument(
        "--refresh", type=_positive_float, default=1.0, metavar="SECS", help="redraw interval (default: %(default)s)"
    )
    parser.add_argument("--once", action="store_true", help="read what is there, print one frame and exit")
    parser.add_argument(
        "--idle-timeout",
        type=_positive_float,
        metavar="SECS",
        help=f"with --once: stop reading after this long without a record (default: {DEFAULT_IDLE_TIMEOUT_SECS:g}); "
        "otherwise exit after this long without one (default: never)",
    )
    parser.add_argument(
        "--stale-after",
        type=_positive_float,
        default=DEFAULT_STALENESS_SECS,
        metavar="SECS",
        help="mark a version stale when no record came for this long (default: %(default)s)",
    )


def main(args: argparse.Namespace, project: str) -> int:
    """Run `rtml top` with parsed arguments; the exit code (0, also after Ctrl-C)."""
    try:
        run(
            args.subscription,
            project,
            refresh_secs=args.refresh,
            once=args.once,
            idle_timeout=args.idle_timeout,
            staleness_secs=getattr(args, "stale_after", DEFAULT_STALENESS_SECS),
        )
    except TopError as err:
        from rtml.cli import CommandError

        raise CommandError(str(err)) from None
    return 0
