"""Start, stop and inspect the local Pub/Sub and Bigtable emulators, and create their resources.

The emulators come from the Google Cloud CLI's components. `start` records the process it
launched for each (pid, process group, start time) in a state file, and `stop` stops exactly
those processes, checking the start time first so a recycled pid is never signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rtml import config

STATE_FILE = "emulators.json"
READY_TIMEOUT_S = 90.0


class EmulatorError(RuntimeError):
    """Something the user has to act on: a missing component, a busy port, a failed start."""


@dataclass(frozen=True)
class Emulator:
    name: str
    host: str
    command: list[str]

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def hostname(self) -> str:
        return self.host.rsplit(":", 1)[0]


def sdk_root() -> Path:
    """The Google Cloud CLI's install folder (`$CLOUDSDK_ROOT_DIR`, else from `gcloud info`)."""
    candidates = []
    if os.environ.get("CLOUDSDK_ROOT_DIR"):
        candidates.append(Path(os.environ["CLOUDSDK_ROOT_DIR"]))
    gcloud = shutil.which("gcloud")
    if gcloud:
        try:
            out = subprocess.run(
                [gcloud, "info", "--format=value(installation.sdk_root)"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out:
            candidates.append(Path(out))
        candidates.append(Path(os.path.realpath(gcloud)).parent.parent)
    candidates += [Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk")]
    for path in candidates:
        if (path / "platform").is_dir():
            return path
    raise EmulatorError(
        "the Google Cloud CLI was not found. Install it (https://cloud.google.com/sdk/docs/install), "
        "or set CLOUDSDK_ROOT_DIR to its folder."
    )


def emulators(services: config.LocalServices, root: Path | None = None) -> list[Emulator]:
    """The two emulator commands, after checking their components and Java are installed."""
    root = root or sdk_root()
    pubsub = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    bigtable = root / "platform" / "bigtable-emulator" / "cbtemulator"
    missing = []
    if not pubsub.exists():
        missing.append(
            "the Pub/Sub emulator: `gcloud components install pubsub-emulator` "
            "(or `apt-get install google-cloud-cli-pubsub-emulator`)"
        )
    if not bigtable.exists():
        missing.append(
            "the Bigtable emulator: `gcloud components install bigtable` (or `apt-get install google-cloud-cli-cbt`)"
        )
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing.append("Java 11 or newer, for the Pub/Sub emulator: e.g. `apt-get install openjdk-17-jre-headless`")
    if missing:
        raise EmulatorError("missing " + "; ".join(missing))
    ps, bt = services.pubsub_host.rsplit(":", 1), services.bigtable_host.rsplit(":", 1)
    return [
        Emulator("pubsub", services.pubsub_host, [str(pubsub), f"--host={ps[0]}", f"--port={ps[1]}"]),
        Emulator("bigtable", services.bigtable_host, [str(bigtable), "-host", bt[0], "-port", bt[1]]),
    ]


def start(services: config.LocalServices, state: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Start whichever emulator is not already running, wait until both answer, create resources."""
    state = Path(state or config.state_dir())
    state.mkdir(parents=True, exist_ok=True)
    records = _load(state)
    to_start = []
    for emulator in emulators(services):
        record = records.get(emulator.name)
        if record and _alive(record) and record["host"] == emulator.host:
            log(f"{emulator.name} emulator already running (pid {record['pid']}) on {emulator.host}")
        elif _port_open(emulator.hostname, emulator.port):
            raise EmulatorError(
                f"port {emulator.port} is already in use by a process `rtml up` did not start; "
                f"stop it, or choose another port for the {emulator.name} emulator"
            )
        else:
            to_start.append(emulator)
    for emulator in to_start:
        logfile = open(state / f"{emulator.name}.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            emulator.command,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logfile.close()
        records[emulator.name] = {
            "pid": process.pid,
            "start_ticks": _start_ticks(process.pid),
            "host": emulator.host,
            "command": emulator.command,
            "log": str(state / f"{emulator.name}.log"),
        }
        _save(state, records)
        log(f"started {emulator.name} emulator (pid {process.pid}) on {emulator.host}")
    wait_until_ready(services, records)
    ensure_resources(services)
    log(
        f"ready: Pub/Sub {services.pubsub_host}, Bigtable {services.bigtable_host}, "
        f"project {services.project}, instance {services.instance}"
    )
    return records


def stop(state: Path | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Stop the processes `start` recorded; returns the names of those it stopped."""
    state = Path(state or config.state_dir())
    records = _load(state)
    stopped = []
    for name, record in records.items():
        if not _alive(record):
            log(f"{name} emulator (pid {record['pid']}) was not running")
            continue
        _terminate(record["pid"])
        stopped.append(name)
        log(f"stopped {name} emulator (pid {record['pid']})")
    path = state / STATE_FILE
    if path.exists():
        path.unlink()
    return stopped


def status(services: config.LocalServices, state: Path | None = None) -> list[dict]:
    """One row per emulator: recorded pid, whether that process lives, whether its port answers."""
    records = _load(Path(state or config.state_dir()))
    rows = []
    for name, host in (("pubsub", services.pubsub_host), ("bigtable", services.bigtable_host)):
        record = records.get(name)
        hostname, port = host.rsplit(":", 1)
        rows.append(
            {
                "emulator": name,
                "host": record["host"] if record else host,
                "pid": record["pid"] if record else None,
                "running": bool(record and _alive(record)),
                "answering": _port_open(hostname, int(port)),
            }
        )
    return rows


def wait_until_ready(
    services: config.LocalServices, records: dict | None = None, timeout: float = READY_TIMEOUT_S
) -> None:
    """Block until both emulators answer a real request, or raise with the log's last lines."""
    deadline = time.monotonic() + timeout
    checks = {"pubsub": lambda: _pubsub_answers(services), "bigtable": lambda: _bigtable_answers(services)}
    for name, check in checks.items():
        while True:
            record = (records or {}).get(name)
            if record and not _alive(record):
                raise EmulatorError(f"the {name} emulator exited during start-up:\n{_tail(record.get('log'))}")
            if check():
                break
            if time.monotonic() > deadline:
                tail = _tail(record.get("log")) if record else ""
                raise EmulatorError(f"the {name} emulator did not answer within {timeout:.0f} s\n{tail}")
            time.sleep(0.25)


def ensure_resources(services: config.LocalServices) -> None:
    """Create the topics, `<topic>-sub` subscriptions and the feature table, if missing."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    with emulator_environment(services):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        try:
            for topic in services.topics:
                topic_path = config.topic_path(services.project, topic)
                try:
                    publisher.create_topic(request={"name": topic_path})
                except exceptions.AlreadyExists:
                    pass
                sub_path = config.subscription_path(services.project, config.subscription_for(topic))
                try:
                    subscriber.create_subscription(request=subscription_request(sub_path, topic_path, topic))
                except exceptions.AlreadyExists:
                    pass
        finally:
            subscriber.close()
        ensure_feature_table(services)


def subscription_request(sub_path: str, topic_path: str, topic: str) -> dict:
    """A `<topic>-sub` subscription; an input topic's keeps acknowledged messages, for `rtml seek`."""
    request = {"name": sub_path, "topic": topic_path, "ack_deadline_seconds": 60}
    if topic in config.INPUT_TOPICS:
        request["retain_acked_messages"] = True
    return request


def ensure_feature_table(services: config.LocalServices, table_id: str = config.FEATURES_TABLE) -> None:
    """The feature table with every column family and its max-age garbage-collection rule."""
    import datetime as dt

    from google.cloud.bigtable import Client, column_family

    with emulator_environment(services):
        client = Client(project=services.project, admin=True)
        table = client.instance(services.instance).table(table_id)
        rules = {
            name: column_family.MaxAgeGCRule(dt.timedelta(days=days)) for name, days in config.FEATURE_FAMILIES.items()
        }
        if not table.exists():
            table.create(column_families=rules)
        else:
            present = table.list_column_families()
            for name, rule in rules.items():
                if name not in present:
                    table.column_family(name, rule).create()
        client.close()


@contextmanager
def emulator_environment(services: config.LocalServices) -> Iterator[None]:
    """Point Google's client libraries at the emulators for the duration of the block."""
    saved = {key: os.environ.get(key) for key in services.environ()}
    os.environ.update(services.environ())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _pubsub_answers(services: config.LocalServices) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{services.pubsub_host}/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _bigtable_answers(services: config.LocalServices) -> bool:
    hostname, port = services.bigtable_host.rsplit(":", 1)
    if not _port_open(hostname, int(port)):
        return False
    from google.cloud.bigtable import Client

    try:
        with emulator_environment(services):
            client = Client(project=services.project, admin=True)
            client.instance(services.instance).list_tables()
            client.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False


def _port_open(hostname: str, port: int) -> bool:
    try:
        with socket.create_connection((hostname, port), timeout=1):
            return True
    except OSError:
        return False


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a recycled pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(record: dict) -> bool:
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    recorded = record.get("start_ticks")
    if recorded is None:
        return True
    return _start_ticks(pid) == recorded and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `start` created (its leader is `pid`), then SIGKILL if needed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:
                    return
            except ChildProcessError:
                pass
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.1)


def _load(state: Path) -> dict:
    path = state / STATE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _save(state: Path, records: dict) -> None:
    tmp = state / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(records, indent=2))
    tmp.replace(state / STATE_FILE)


def _tail(path: str | None, lines: int = 20) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as handle:
        text = handle.read()[-8192:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])
