"""Flex Template entry point: start the pipeline this template image is for, without waiting.

The Dockerfile names this file in FLEX_TEMPLATE_PYTHON_PY_FILE. The Dataflow launcher runs it with
the job's parameters as `--name=value` arguments; it starts `beam_pipelines.$RTML_PIPELINE` through
that module's `start(argv)` if it has one (a module whose `run()` waits for its result, like train),
else its `run(argv)`; either submits the job and returns (a Flex Template must not wait for the
job). Every template image is the same image with RTML_PIPELINE set (see templates/README.md).

The launcher executes this file as `__main__`, so it defines nothing a pipeline could pickle.
"""

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

PIPELINE_ENV = "RTML_PIPELINE"
# The image's own tag, baked in at build time, so workers run the same image as the launcher
# even when the caller does not pass `sdk_container_image`.
SDK_IMAGE_ENV = "RTML_SDK_CONTAINER_IMAGE"

_LOG = logging.getLogger("rtml.launch")


def pipeline_module(name: str | None) -> ModuleType:
    """The `beam_pipelines.NAME` module to start; exits with a message if there is none."""
    if not name or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        sys.exit(f"{PIPELINE_ENV} must name a pipeline module of beam_pipelines (e.g. backfill), got {name!r}")
    try:
        module = importlib.import_module(f"beam_pipelines.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"beam_pipelines.{name}":
            raise
        sys.exit(f"{PIPELINE_ENV}={name}: there is no module beam_pipelines.{name} in this image")
    if entry_point(module) is None:
        sys.exit(f"beam_pipelines.{name} has no start(argv) or run(argv) to start it with")
    return module


def entry_point(module: ModuleType) -> Callable | None:
    """The function that submits the module's job and returns: `start`, else `run`."""
    for name in ("start", "run"):
        function = getattr(module, name, None)
        if callable(function):
            return function
    return None


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def pipeline_args(argv: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """`argv` with the template defaults the caller did not override.

    A template always runs on Dataflow (the pipelines would otherwise pick a local runner and the
    emulators), and its workers run this same image, named by the image's own environment.
    """
    args = list(argv)
    if not _given(args, "--runner"):
        args.append("--runner=DataflowRunner")
    image = environ.get(SDK_IMAGE_ENV)
    if image and not _given(args, "--sdk_container_image"):
        args.append(f"--sdk_container_image={image}")
    return args


def launch(name: str | None, argv: list[str]):
    """Start pipeline `name` with `argv`; returns its `PipelineResult` as soon as it is submitted."""
    module = pipeline_module(name)
    args = pipeline_args(argv)
    _LOG.info("starting beam_pipelines.%s", name)
    return entry_point(module)(args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch(os.environ.get(PIPELINE_ENV), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
