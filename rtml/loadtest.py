"""Drive a running streaming pipeline with a replay file and measure what comes out.

Used by `rtml demo` and the streaming benchmarks: the replay runs in a thread (paced or as fast
as possible) and records when each transaction was handed to the publisher; the caller's thread
reads the output subscription (messages carry a `transaction_id` attribute) and the dead-letter
subscription until everything expected has arrived or nothing has for `idle_timeout_s`. Latency
is the output message's Pub/Sub publish time minus the input's publish time, both on this
machine's clock.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtml import pubsub_tools


@dataclass
class StreamRun:
    published_at_us: dict[str, int] = field(default_factory=dict)  # transaction_id -> wall time
    outputs: dict[str, pubsub_tools.PulledMessage] = field(default_factory=dict)
    duplicates: int = 0
    dead_letters: Counter = field(default_factory=Counter)  # error_kind -> count
    stats: pubsub_tools.ReplayStats | None = None
    replay_started_us: int = 0

    def latencies_ms(self, after_s: float = 0.0) -> np.ndarray:
        """Publish-to-output latency of each transaction published at least `after_s` seconds
        into the replay (a pipeline that starts as the replay does is still starting up at first)."""
        since_us = self.replay_started_us + after_s * 1e6
        return np.array(
            [
                (m.publish_time_us - self.published_at_us[tx]) / 1000
                for tx, m in self.outputs.items()
                if tx in self.published_at_us and self.published_at_us[tx] >= since_us
            ]
        )

    def latency_percentiles(self, *qs: float, after_s: float = 0.0) -> list[float]:
        latencies = self.latencies_ms(after_s)
        return [float(np.percentile(latencies, q)) if latencies.size else float("nan") for q in qs]

    def throughput(self) -> float:
        """Outputs per second, from the first input published to the last output."""
        if not self.outputs:
            return 0.0
        last = max(m.publish_time_us for m in self.outputs.values())
        return len(self.outputs) / max((last - self.replay_started_us) / 1e6, 1e-9)


def drive(
    replay_file: str | Path,
    project: str,
    topics: dict[str, str],
    output_subscription: str,
    dead_letter_subscription: str | None,
    expected_outputs: int,
    process=None,
    rate: float | None = None,
    malformed_rate: float = 0.0,
    idle_timeout_s: float = 60.0,
    progress: bool = True,
    label: str = "outputs",
) -> StreamRun:
    """Replay `replay_file` into `topics` and collect `expected_outputs` outputs (see module doc)."""
    from tqdm import tqdm

    run = StreamRun()
    failure: list[BaseException] = []

    def on_publish(line, wall_us: int) -> None:
        if line.kind == "transaction":
            run.published_at_us.setdefault(str(line.event.get("transaction_id")), wall_us)

    def publish() -> None:
        try:
            run.stats = pubsub_tools.replay(
                replay_file,
                project=project,
                transactions_topic=topics["transactions"],
                feedback_topic=topics["fraud-feedback"],
                rate=rate,
                malformed_rate=malformed_rate,
                progress=False,
                on_publish=on_publish,
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(err)

    run.replay_started_us = time.time_ns() // 1000
    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    last_progress = time.monotonic()
    with tqdm(total=expected_outputs, desc=label, unit="msg", file=sys.stderr, disable=not progress) as bar:

        def take_output(message) -> None:
            tx = message.attributes.get("transaction_id", "")
            if tx in run.outputs:
                run.duplicates += 1
            else:
                run.outputs[tx] = message
                bar.update(1)

        def take_dead(message) -> None:
            run.dead_letters[message.attributes.get("error_kind", "?")] += 1

        while time.monotonic() - last_progress < idle_timeout_s:
            if failure:
                raise failure[0]
            if process is not None:
                process.check_running()
            before = len(run.outputs) + sum(run.dead_letters.values())
            pubsub_tools.pull(output_subscription, project, idle_timeout=0.5, on_message=take_output)
            if dead_letter_subscription:
                pubsub_tools.pull(dead_letter_subscription, project, idle_timeout=0.2, on_message=take_dead)
            if len(run.outputs) + sum(run.dead_letters.values()) > before or thread.is_alive():
                last_progress = time.monotonic()
            malformed = sum(run.stats.malformed.values()) if run.stats else None
            if not thread.is_alive() and len(run.outputs) >= expected_outputs and (
                malformed is None or sum(run.dead_letters.values()) >= malformed or not dead_letter_subscription
            ):
                break
        # A short look for extras: a second output for a transaction, or a stray dead letter.
        pubsub_tools.pull(output_subscription, project, idle_timeout=3.0, on_message=take_output)
        if dead_letter_subscription:
            pubsub_tools.pull(dead_letter_subscription, project, idle_timeout=1.0, on_message=take_dead)
    thread.join()
    if failure:
        raise failure[0]
    return run
