"""Test helpers for reading what a pipeline published (real emulator, no mocks)."""

import json
import time

from rtml import pubsub_tools


def collect(subscription: str, project: str, expected: int, timeout_s: float = 120.0, process=None) -> list:
    """Pull until `expected` messages arrived (or the timeout), then a short extra wait for extras.

    Returns the pulled messages; callers assert on the count, so a missing or an extra message
    fails the test. `process` (a PipelineProcess) is checked so a crashed pipeline fails fast.
    """
    messages = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < expected and time.monotonic() < deadline:
        if process is not None:
            process.check_running()
        pubsub_tools.pull(subscription, project, idle_timeout=1.0, on_message=messages.append)
    pubsub_tools.pull(subscription, project, idle_timeout=3.0, on_message=messages.append)
    return messages


def decoded(messages) -> list[dict]:
    return [json.loads(m.data) for m in messages]
