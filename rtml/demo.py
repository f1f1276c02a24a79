"""`rtml demo`: the loop that exists so far, end to end on the local emulators, with a summary.

Emulators up -> simulate a small history -> start the streaming validation pipeline -> replay
the file through Pub/Sub with a share of malformed messages mixed in -> read back every accepted
event and every dead letter -> print the counts and whether they reconcile.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from rtml import config, emulators, pubsub_tools, simulator
from rtml.processes import PipelineProcess

DEMO_DAYS = 14
DEMO_CUSTOMERS = 300
DEMO_TERMINALS = 600
MALFORMED_RATE = 0.02
READ_BACK_IDLE_S = 60.0


def _step(text: str) -> None:
    print(f"\n==> {text}", file=sys.stderr, flush=True)


def run(services: config.LocalServices, workdir: str = "out/demo", keep_emulators: bool = False) -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    started_here = not all(row["running"] or row["answering"] for row in emulators.status(services))
    _step("starting the local emulators")
    emulators.start(services, log=lambda text: print(text, file=sys.stderr))
    env = services.environ()
    try:
        with emulators.emulator_environment(services):
            return _loop(services, work, env)
    finally:
        if started_here and not keep_emulators:
            _step("stopping the emulators this demo started")
            emulators.stop(log=lambda text: print(text, file=sys.stderr))


def _loop(services: config.LocalServices, work: Path, env: dict[str, str]) -> int:
    replay_file = work / "history.jsonl"
    _step(f"simulating {DEMO_DAYS} days of {DEMO_CUSTOMERS} customers at {DEMO_TERMINALS} terminals")
    summary = simulator.simulate_to_file(
        simulator.SimulationConfig(days=DEMO_DAYS, customers=DEMO_CUSTOMERS, terminals=DEMO_TERMINALS),
        replay_file,
        progress=True,
    )
    outputs = {
        "validated": config.subscription_for(config.VALIDATED_TOPIC),
        "dead letters": config.subscription_for(config.DEAD_LETTER_TOPIC),
    }
    for name in outputs.values():
        pubsub_tools.drain(name, services.project)

    _step("starting the streaming validation pipeline (python -m beam_pipelines.validate)")
    pipeline = PipelineProcess("beam_pipelines.validate", [f"--project={services.project}"], work / "validate.log", env)
    with pipeline:
        _step(f"replaying {replay_file} with {MALFORMED_RATE:.0%} malformed messages mixed in")
        stats = pubsub_tools.replay(replay_file, project=services.project, malformed_rate=MALFORMED_RATE)
        _step("reading back accepted events and dead letters")
        expected = {"validated": stats.transactions + stats.feedback, "dead letters": sum(stats.malformed.values())}
        received, kinds, seconds = _read_back(outputs, expected, pipeline)
    _print_summary(summary, stats, received, kinds, seconds, expected)
    return 0 if received == expected and kinds == stats.malformed else 1


def _read_back(outputs: dict[str, str], expected: dict[str, int], pipeline: PipelineProcess):
    from tqdm import tqdm

    received = Counter({name: 0 for name in outputs})
    kinds: Counter = Counter()
    started = time.monotonic()
    last_progress = time.monotonic()
    with tqdm(total=sum(expected.values()), desc="read back", unit="msg", file=sys.stderr) as bar:
        while received != expected and time.monotonic() - last_progress < READ_BACK_IDLE_S:
            pipeline.check_running()
            for name, subscription in outputs.items():

                def take(message, name=name):
                    received[name] += 1
                    if name == "dead letters":
                        kinds[message.attributes.get("error_kind", "?")] += 1
                    bar.update(1)

                if pubsub_tools.pull(subscription, count=None, idle_timeout=0.5, on_message=take):
                    last_progress = time.monotonic()
    return dict(received), kinds, time.monotonic() - started


def _print_summary(summary, stats, received, kinds, seconds, expected) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rtml demo: replay through validation")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("simulated transactions", summary.transactions),
        ("simulated fraud reports (feedback)", summary.feedback),
        ("published good events", stats.transactions + stats.feedback),
        ("published malformed messages", sum(stats.malformed.values())),
        ("accepted by validation", received["validated"]),
        ("dead letters", received["dead letters"]),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:,}")
    for kind, count in sorted(kinds.items()):
        table.add_row(f"  dead letters: {kind}", f"{count:,}")
    table.add_row("events/s through the pipeline", f"{sum(received.values()) / max(seconds, 1e-9):,.0f}")
    ok = received == expected
    table.add_row("reconciled (every input is one output)", "yes" if ok else "NO")
    Console().print(table)
    if not ok:
        print(json.dumps({"expected": expected, "received": received}), file=sys.stderr)
