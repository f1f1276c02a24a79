"""Run a pipeline module as a child process (the demo and the tests use this to drive streaming jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class PipelineProcess:
    """`python -m MODULE ARGS` in its own process group, output to a log file.

    Use as a context manager: the process group is stopped on exit (SIGINT, then SIGKILL).
    """

    def __init__(self, module: str, args: list[str], log_path: str | Path, env: dict[str, str] | None = None):
        self.module = module
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> PipelineProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.module} exited with code {self.process.returncode}; last log lines:\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for fault tests)."""
        if self.running:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.running:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.1)
        if self.process.poll() is None:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            text = handle.read()[-16384:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PipelineProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
