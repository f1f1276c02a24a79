"""Flex Templates: metadata against the pipelines' options, offline Dataflow translation, one image, setup.

Generic over `templates/*/metadata.json`. A new pipeline gets a line in DRY_RUNS; a new template
folder is picked up by itself and must have a DRY_RUNS line for its pipeline.
"""

import argparse
import importlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from packaging.specifiers import SpecifierSet

from rtml import config

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
METADATA_FILES = sorted(TEMPLATES.glob("*/metadata.json"))
TEMPLATE_NAMES = [path.parent.name for path in METADATA_FILES]
SETUP_SCRIPT = TEMPLATES / "setup_gcp.sh"


@dataclass(frozen=True)
class DryRun:
    """A pipeline to translate for Dataflow: its module, mode, required options, stable step labels."""

    module: str
    streaming: bool
    args: tuple[str, ...]
    labels: tuple[str, ...]  # top-level step names; a streaming --update matches steps by these


# One line per pipeline module; validate and featurize are score's front half on their own.
DRY_RUNS = (
    DryRun(
        "backfill",
        streaming=False,
        args=("--input=gs://fake-bucket/history/history.jsonl", "--examples_out=gs://fake-bucket/examples"),
        labels=(
            "ListInputs",
            "SplitFiles",
            "Distribute",
            "Parse",
            "GroupByTerminalShard",
            "TerminalFeatures",
            "GroupByCustomerShard",
            "CustomerFeaturesAndExamples",
            "WriteExamples",
            "RejectedToJson",
            "WriteRejected",
        ),
    ),
    DryRun(
        "train",
        streaming=False,
        args=(
            "--examples=gs://fake-bucket/examples",
            "--train_start=2026-01-01",
            "--train_end=2026-02-28",
            "--model_dir=gs://fake-bucket/models",
            "--work_dir=gs://fake-bucket/train-work",
        ),
        labels=(
            "ReadExamples",
            "SplitByTime",
            "AnalyzeAndTransform",
            "TransformValidation",
            "WriteTransformFn",
            "WriteTrain",
            "WriteValidation",
            "WriteValidationRaw",
            "WriteStatistics",
            "WriteValidationCounts",
            "Written",
            "Plan",
            "TrainAndExport",
        ),
    ),
    DryRun(
        "score",
        streaming=True,
        args=("--model_dir=gs://fake-bucket/models",),
        labels=(
            "ReadEvents",
            "ComputeFeatures",
            "ScoreTransactions",
            "MonitorModel",
            "PublishResults",
        ),
    ),
    DryRun(
        "validate",
        streaming=True,
        args=(),
        labels=("ReadEvents", "FlattenEvents", "ToMessage", "PublishEvents", "WriteDeadLetters"),
    ),
    DryRun(
        "featurize",
        streaming=True,
        args=(),
        labels=(
            "ReadEvents",
            "ComputeFeatures",
            "ToMessage",
            "PublishFeatures",
        ),
    ),
)
DRY_RUN_BY_MODULE = {case.module: case for case in DRY_RUNS}

SDK_IMAGE = "us-central1-docker.pkg.dev/fake-project/rtml/beam-rtml:test"
# What the Flex Template launcher passes, for a project that does not exist. `dry_run` makes
# Beam's DataflowRunner return the translated job before it creates an API client, stages
# files or looks up credentials; a valid gs:// temp_location keeps option validation from
# creating a default bucket in GCS.
LAUNCHER_ARGS = (
    "--runner=DataflowRunner",
    "--dry_run=True",
    "--project=fake-project",
    "--region=us-central1",
    "--temp_location=gs://fake-bucket/tmp",
    "--job_name=rtml-dry-run",
    "--experiments=disable_logging_submission_environment",  # no `pip freeze` subprocess
    "--no_save_main_session",  # the main module here is pytest's, not the launcher's
)
DATAFLOW_DRY_RUN = (*LAUNCHER_ARGS, f"--sdk_container_image={SDK_IMAGE}")

# Fields of the Dataflow API's TemplateMetadata and ParameterMetadata messages.
TEMPLATE_FIELDS = {
    "name",
    "description",
    "parameters",
    "streaming",
    "supportsAtLeastOnce",
    "supportsExactlyOnce",
    "defaultStreamingMode",
    "yamlDefinition",
}
PARAMETER_FIELDS = {
    "name",
    "label",
    "helpText",
    "isOptional",
    "regexes",
    "paramType",
    "defaultValue",
    "enumOptions",
    "groupName",
    "hiddenUi",
    "parentName",
    "parentTriggerValues",
    "customMetadata",
}

# Every regex a template uses, with a realistic value it must accept and a wrong one it must
# reject. A template with a new regex needs a line here; the first value is also the sample
# value the tests launch the template with.
GCS_PATH = r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9]/[^\n\r]+$"
TOPIC_PATH = r"^projects/[^/]+/topics/[^/]+$"
SUBSCRIPTION_PATH = r"^projects/[^/]+/subscriptions/[^/]+$"
REGEX_EXAMPLES = {
    GCS_PATH: ("gs://rtml-bucket/history/history.jsonl", "/home/me/history.jsonl"),
    TOPIC_PATH: ("projects/my-project/topics/fraud-insights", "fraud-insights"),
    SUBSCRIPTION_PATH: (
        "projects/my-project/subscriptions/transactions-sub",
        "projects/my-project/topics/transactions",
    ),
    r"^[1-9][0-9]*$": ("8", "0"),
    r"^[0-9]+$": ("42", "-1"),
    r"^([1-9][0-9]*(\.[0-9]+)?|0?\.[0-9]*[1-9][0-9]*)$": ("20", "0"),
    r"^[0-9]+(\.[0-9]+)?$": ("0.5", "-1"),
    r"^0?\.[0-9]*[1-9][0-9]*$": ("0.02", "2"),
    r"^(0?\.[0-9]*[1-9][0-9]*|1(\.0+)?)$": ("0.8", "80"),
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$": ("2026-01-01", "2026/01/01"),
    r"^[A-Za-z0-9][-_.A-Za-z0-9]*$": ("v2026-03-01", "models/v1"),
    r"^[a-z][-a-z0-9]{4,31}[a-z0-9]$": ("rtml-features", "Features_1"),
    r"^[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,49}$": ("features", "feature table"),
    r"^(true|false)$": ("false", "yes"),
}

# Parameters whose sample must differ from their regex's first example: a training window must be
# longer than its validation days (sampled as 8 from their regex), so its end lies after its start.
PARAMETER_SAMPLES = {"train_end": "2026-02-28"}


def _metadata(name: str) -> dict:
    return json.loads((TEMPLATES / name / "metadata.json").read_text())


def _parameters(name: str) -> dict[str, dict]:
    return {param["name"]: param for param in _metadata(name)["parameters"]}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Fail on any attempt to reach a network or look up credentials; keep temp files in tmp_path."""
    import google.auth
    import grpc

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run tried to reach the network or credentials: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(grpc, "secure_channel", refuse)
    monkeypatch.setattr(grpc, "insecure_channel", refuse)
    monkeypatch.setattr(google.auth, "default", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("RTML_PIPELINE", raising=False)
    monkeypatch.delenv("RTML_SDK_CONTAINER_IMAGE", raising=False)
    # TensorFlow reaches gs:// through its own C++ client, below the socket guards: refuse that too.
    # tf.Transform makes its temp folder under --work_dir while the train graph is built (on
    # Dataflow that is the launcher's one write, to the bucket); here the folder is local.
    import tensorflow_transform.beam as tft_beam
    from tensorflow.python.lib.io import file_io

    monkeypatch.setattr(file_io, "_pywrap_file_io", _RefuseGcs(file_io._pywrap_file_io))

    def local_tft_temp_dir(cls) -> str:
        path = tmp_path / "tftransform_tmp"
        path.mkdir(exist_ok=True)
        return str(path)

    monkeypatch.setattr(tft_beam.Context, "create_base_temp_dir", classmethod(local_tft_temp_dir))


class _RefuseGcs:
    """TensorFlow's file functions, each refusing a gs:// path."""

    def __init__(self, functions):
        self._functions = functions

    def __getattr__(self, name):
        function = getattr(self._functions, name)
        if not callable(function):
            return function

        def guarded(*args, **kwargs):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, str | bytes) and arg[:5] in ("gs://", b"gs://"):
                    raise AssertionError(f"a dry run tried to reach Cloud Storage through TensorFlow: {name}({arg!r})")
            return function(*args, **kwargs)

        return guarded


def _launcher():
    spec = importlib.util.spec_from_file_location("rtml_template_launch", TEMPLATES / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_option_views(monkeypatch) -> set[type]:
    """The PipelineOptions classes read (`view_as`) from now on: the options a pipeline uses."""
    seen: set[type] = set()
    original = PipelineOptions.view_as

    def view_as(self, cls):
        seen.add(cls)
        return original(self, cls)

    monkeypatch.setattr(PipelineOptions, "view_as", view_as)
    return seen


def _flags(classes) -> dict[str, tuple[argparse.ArgumentParser, argparse.Action]]:
    """`--flag` name (without dashes) -> (its class's own parser, its action), over `classes`."""
    flags = {}
    for cls in classes:
        parser = _BeamArgumentParser(allow_abbrev=False)
        cls._add_argparse_args(parser)
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    flags[option[2:]] = (parser, action)
    return flags


def _all_options_classes(cls=PipelineOptions) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_options_classes(sub)}
    return found


def _sample(param: dict) -> str:
    """A realistic value for a parameter: its own, its regex's example, else one its option's type accepts."""
    if param["name"] in PARAMETER_SAMPLES:
        return PARAMETER_SAMPLES[param["name"]]
    if param.get("regexes"):
        return REGEX_EXAMPLES[param["regexes"][0]][0]
    action = _flags(_all_options_classes()).get(param["name"], (None, None))[1]
    if action is not None and action.choices:
        return str(list(action.choices)[-1])
    if action is not None and action.type in (int, float):
        return "3"
    return "sample"


def _template_args(name: str) -> list[str]:
    importlib.import_module(f"beam_pipelines.{name}")  # registers its options classes
    return [f"--{param_name}={_sample(param)}" for param_name, param in _parameters(name).items()]


def _dry_run(module: str, argv) -> object:
    """Translate `beam_pipelines.<module>` for Dataflow, through the entry the launcher calls; the
    `apiclient.Job` it would submit."""
    result = _launcher().entry_point(importlib.import_module(f"beam_pipelines.{module}"))(list(argv))
    return result.job


def _step_names(job) -> set[str]:
    return {transform.unique_name for transform in job.proto_pipeline.components.transforms.values()}


def _environments(job):
    return list(job.proto_pipeline.components.environments.values())


def _container_images(job) -> set[str]:
    return {
        beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        for env in _environments(job)
        if env.urn == common_urns.environments.DOCKER.urn
    }


def _pubsub_reads(job) -> list:
    return [
        beam_runner_api_pb2.PubSubReadPayload.FromString(transform.spec.payload)
        for transform in job.proto_pipeline.components.transforms.values()
        if transform.spec.urn == common_urns.composites.PUBSUB_READ.urn
    ]


# --- metadata -------------------------------------------------------------------------------


def test_there_is_a_template_and_every_template_has_a_dry_run():
    assert TEMPLATE_NAMES, "no templates/*/metadata.json"
    for name in TEMPLATE_NAMES:
        assert importlib.util.find_spec(f"beam_pipelines.{name}") is not None, f"templates/{name}/ has no pipeline"
        assert name in DRY_RUN_BY_MODULE, f"add a DryRun line for beam_pipelines.{name} to DRY_RUNS"


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_metadata_has_the_flex_template_fields(name):
    metadata = _metadata(name)
    assert set(metadata) <= TEMPLATE_FIELDS, set(metadata) - TEMPLATE_FIELDS
    assert isinstance(metadata["name"], str) and metadata["name"].strip()
    assert isinstance(metadata["description"], str) and metadata["description"].strip()
    assert isinstance(metadata.get("streaming", False), bool)
    assert isinstance(metadata["parameters"], list) and metadata["parameters"]
    names = [param.get("name") for param in metadata["parameters"]]
    assert len(names) == len(set(names)), f"duplicate parameters in {names}"
    for param in metadata["parameters"]:
        assert set(param) <= PARAMETER_FIELDS, (param.get("name"), set(param) - PARAMETER_FIELDS)
        for field in ("name", "label", "helpText"):
            assert isinstance(param.get(field), str) and param[field].strip(), (param.get("name"), field)
        assert isinstance(param.get("isOptional"), bool), (param["name"], "isOptional must be true or false")
        assert re.fullmatch(r"[a-z][a-z0-9_]*", param["name"]), param["name"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_parameter_regexes_accept_a_realistic_value_and_reject_a_wrong_one(name):
    for param in _metadata(name)["parameters"]:
        for regex in param.get("regexes", []):
            assert regex in REGEX_EXAMPLES, f"{name}.{param['name']}: add examples for {regex!r} to REGEX_EXAMPLES"
            good, bad = REGEX_EXAMPLES[regex]
            pattern = re.compile(regex)
            assert pattern.fullmatch(good), (param["name"], regex, good)
            assert not pattern.fullmatch(bad), (param["name"], regex, bad)
            if param["name"] in PARAMETER_SAMPLES:
                assert pattern.fullmatch(PARAMETER_SAMPLES[param["name"]]), (param["name"], regex)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_enum_parameters_offer_exactly_their_option_s_choices(name):
    importlib.import_module(f"beam_pipelines.{name}")  # registers its options classes
    flags = _flags(_all_options_classes())
    for param in _metadata(name)["parameters"]:
        action = flags[param["name"]][1] if param["name"] in flags else None
        if param.get("paramType") == "ENUM" or (action is not None and action.choices):
            assert param.get("paramType") == "ENUM", f"{name}.{param['name']}: a choice of values is an ENUM"
            values = [option["value"] for option in param.get("enumOptions", [])]
            assert action is not None and values == list(action.choices), (param["name"], values)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_parameters_are_options_the_pipeline_reads(name, offline, monkeypatch):
    seen = _record_option_views(monkeypatch)
    try:
        _dry_run(name, [*DATAFLOW_DRY_RUN, *_template_args(name)])
    except SystemExit:
        pytest.fail(f"{name}: a parameter does not parse as --name=value, the form the launcher passes it in")
    flags = _flags(seen)
    for param_name, param in _parameters(name).items():
        assert param_name in flags, f"{name}: parameter {param_name} is not an option beam_pipelines.{name} reads"
        parser, action = flags[param_name]
        arg = f"--{param_name}={_sample(param)}"
        try:
            expected = getattr(parser.parse_args([arg]), action.dest)
            parsed = PipelineOptions([arg]).get_all_options(retain_unknown_options=False)
        except SystemExit:
            pytest.fail(f"{name}: {arg} does not parse; the launcher passes every parameter as name=value")
        assert parsed[action.dest] == expected, (arg, parsed[action.dest])


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_option_the_pipeline_requires_is_a_required_parameter(name, offline):
    """Start with the launcher's own options only; each option build() asks for must be declared."""
    params = _parameters(name)
    given: list[str] = []
    for _ in range(len(params) + 1):
        try:
            _dry_run(name, [*DATAFLOW_DRY_RUN, *given])
            break
        except ValueError as err:
            missing = re.search(r"--([a-z][a-z0-9_]*)", str(err))
            assert missing, f"{name} refused its options without naming one: {err}"
            option = missing.group(1)
            assert option in params, f"beam_pipelines.{name} requires --{option}, not a template parameter: {err}"
            assert not params[option]["isOptional"], f"--{option} is required by the pipeline but optional here"
            assert not any(arg.startswith(f"--{option}=") for arg in given), (
                f"--{option}={_sample(params[option])}: {err}"
            )
            given.append(f"--{option}={_sample(params[option])}")
    else:
        pytest.fail(f"{name} kept refusing its options: {given}")


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_a_launch_with_every_parameter_translates_through_the_launcher(name, offline, monkeypatch):
    """As on Dataflow: launch.py, RTML_PIPELINE from the image, workers on the image's own tag."""
    monkeypatch.setenv("RTML_PIPELINE", name)
    monkeypatch.setenv("RTML_SDK_CONTAINER_IMAGE", SDK_IMAGE)
    launcher_args = [arg for arg in LAUNCHER_ARGS if not arg.startswith("--runner=")]
    result = _launcher().launch(name, [*launcher_args, *_template_args(name)])
    job = result.job
    streaming = _metadata(name).get("streaming", False)
    assert job.proto.type_.name == ("JOB_TYPE_STREAMING" if streaming else "JOB_TYPE_BATCH")
    assert _container_images(job) == {SDK_IMAGE}
    assert set(DRY_RUN_BY_MODULE[name].labels) <= _step_names(job)


# --- the launcher ---------------------------------------------------------------------------


def test_launcher_runs_on_dataflow_with_the_image_s_own_tag_unless_told_otherwise():
    launcher = _launcher()
    env = {"RTML_SDK_CONTAINER_IMAGE": SDK_IMAGE}
    assert launcher.pipeline_args(["--input=x"], env) == [
        "--input=x",
        "--runner=DataflowRunner",
        f"--sdk_container_image={SDK_IMAGE}",
    ]
    explicit = ["--runner=DataflowRunner", "--sdk_container_image=other:1"]
    assert launcher.pipeline_args(explicit, env) == explicit
    assert launcher.pipeline_args([], {}) == ["--runner=DataflowRunner"]


@pytest.mark.parametrize(
    "name, message",
    [
        (None, "RTML_PIPELINE must name"),
        ("../x", "RTML_PIPELINE must name"),
        ("nosuch", "no module beam_pipelines.nosuch"),
    ],
)
def test_launcher_refuses_a_missing_or_unknown_pipeline(name, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        _launcher().pipeline_module(name)


# --- Dataflow translation -------------------------------------------------------------------


@pytest.mark.parametrize("case", DRY_RUNS, ids=[case.module for case in DRY_RUNS])
def test_pipeline_translates_to_a_dataflow_job_offline(case, offline):
    streaming_only = ("--id_label=event_id", "--timestamp_attribute=published_at") if case.streaming else ()
    job = _dry_run(case.module, [*DATAFLOW_DRY_RUN, *case.args, *streaming_only])
    assert job.proto.type_.name == ("JOB_TYPE_STREAMING" if case.streaming else "JOB_TYPE_BATCH")
    missing = set(case.labels) - _step_names(job)
    assert not missing, f"stable step labels missing from the job: {sorted(missing)}"
    # One image for every step, and nothing to stage: no SDK, requirements or setup.py uploads.
    assert _container_images(job) == {SDK_IMAGE}
    assert all(not env.dependencies for env in _environments(job)), "the job would stage files at launch"
    if case.streaming:
        reads = _pubsub_reads(job)
        assert reads, "a streaming pipeline without a Pub/Sub read"
        for read in reads:
            assert read.subscription.startswith("projects/fake-project/subscriptions/")
            assert (read.id_attribute, read.timestamp_attribute) == ("event_id", "published_at")


# --- one set of pins, one image -------------------------------------------------------------


def _dockerfile() -> str:
    return (TEMPLATES / "Dockerfile").read_text()


def _docker_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", _dockerfile())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def _resolved_from_images() -> list[str]:
    args = {}
    images = []
    for keyword, rest in _docker_instructions():
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value.strip('"'))
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def test_setup_py_takes_its_pins_from_requirements_txt():
    source = (ROOT / "setup.py").read_text()
    assert '"requirements.txt"' in source
    assert "install_requires=pinned_requirements()" in source
    assert "==" not in source, "setup.py must not pin versions of its own"


def test_dockerfile_installs_requirements_txt_and_the_package_and_nothing_else():
    assert "==" not in _dockerfile(), "the Dockerfile must not pin packages of its own"
    runs = [rest for keyword, rest in _docker_instructions() if keyword == "RUN"]
    installs = [cmd.strip() for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert installs == ["pip install -r requirements.txt", "pip install --no-deps ."]
    assert runs.index(next(run for run in runs if "pip check" in run)) >= runs.index(
        next(run for run in runs if "--no-deps ." in run)
    ), "pip check must run after the last install"
    copies = [rest for keyword, rest in _docker_instructions() if keyword == "COPY"]
    assert "requirements.txt ./" in copies


def test_dockerfile_base_images_match_the_python_and_beam_pins():
    images = _resolved_from_images()
    beam = [image for image in images if image.startswith("apache/beam_python")]
    launcher = [image for image in images if "template-launcher-base" in image]
    assert len(beam) == 1 and len(launcher) == 1, images
    beam_python, beam_version = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(.+?)(?: AS \w+)?", beam[0]).groups()
    assert beam_version == _requirement_pins()["apache-beam"]
    launcher_python = re.fullmatch(
        r"gcr\.io/dataflow-templates-base/python(\d)(\d+)-template-launcher-base:.+", launcher[0]
    )
    assert launcher_python, launcher[0]
    assert ".".join(launcher_python.groups()) == beam_python
    python_requires = re.search(r'python_requires="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert SpecifierSet(python_requires).contains(beam_python + ".0"), (beam_python, python_requires)


def test_the_image_is_the_template_launcher_and_the_worker_sdk_container():
    instructions = _docker_instructions()
    stages = [rest.split() for keyword, rest in instructions if keyword == "FROM"]
    beam_stage = next(parts[2] for parts in stages if parts[0].startswith("apache/beam_python") and len(parts) == 3)
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    assert f"--from={beam_stage} /opt/apache/beam /opt/apache/beam" in copies
    assert instructions[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    workdir = next(rest for keyword, rest in instructions if keyword == "WORKDIR")
    assert f"FLEX_TEMPLATE_PYTHON_PY_FILE={workdir}/templates/launch.py" in env
    assert "templates/launch.py templates/launch.py" in copies
    assert "PIP_NO_DEPS=True" in env
    assert "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE" not in env and "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in env
    assert "RTML_PIPELINE=${RTML_PIPELINE}" in env and "RTML_SDK_CONTAINER_IMAGE=${RTML_SDK_CONTAINER_IMAGE}" in env


def test_the_image_copies_every_package_setup_py_installs():
    include = re.search(r"include=\[(.*?)\]", (ROOT / "setup.py").read_text(), re.S).group(1)
    packages = {name for name in re.findall(r'"([\w.]+)"', include) if "." not in name}
    copies = [rest.split() for keyword, rest in _docker_instructions() if keyword == "COPY"]
    copied = {Path(source).parts[0] for parts in copies if not parts[0].startswith("--from") for source in parts[:-1]}
    assert packages <= copied, packages - copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


def _cloudbuild_scripts() -> dict[str, str]:
    """Each Cloud Build step's script as bash would run it, with Cloud Build's substitutions."""
    build = yaml.safe_load((TEMPLATES / "cloudbuild.yaml").read_text())
    values = {**build["substitutions"], "_BUCKET": "fake-bucket", "_TAG": "t1", "PROJECT_ID": "fake-project"}
    scripts = {}
    for step in build["steps"]:
        script = step["args"][-1]
        for key, value in values.items():
            script = script.replace(f"${{{key}}}", value)
        env = [item.replace("${PROJECT_ID}", "fake-project") for item in step.get("env", [])]
        for key, value in values.items():
            env = [item.replace(f"${{{key}}}", value) for item in env]
        scripts[step["id"]] = ("".join(f"export {item}\n" for item in env)) + script.replace("$$", "$")
    return scripts


def test_cloud_build_makes_one_image_tag_and_one_spec_per_template(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("docker", "gcloud"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for step, script in _cloudbuild_scripts().items():
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, (step, done.stderr)
    calls = log.read_text().splitlines()
    image = "us-central1-docker.pkg.dev/fake-project/rtml/beam-rtml"
    builds = [call for call in calls if call.startswith("docker build")]
    assert all("-f templates/Dockerfile" in call and f"RTML_SDK_CONTAINER_IMAGE={image}:t1" in call for call in builds)
    assert len(builds) == len(TEMPLATE_NAMES) + 1
    for name in TEMPLATE_NAMES:
        assert any(f"RTML_PIPELINE={name} -t {image}:t1-{name}" in call for call in builds), name
        assert f"docker push {image}:t1-{name}" in calls
        assert any(
            call.startswith(f"gcloud dataflow flex-template build gs://fake-bucket/templates/{name}.json")
            and f"--image={image}:t1-{name}" in call
            and f"--metadata-file=templates/{name}/metadata.json" in call
            for call in calls
        ), name


# --- setup_gcp.sh ---------------------------------------------------------------------------


@pytest.fixture
def no_cloud_tools(tmp_path) -> dict[str, str]:
    """An environment whose gcloud, cbt and gsutil fail loudly: nothing may reach Google Cloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "cbt", "gsutil", "bq"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} was called: $*" >&2\nexit 97\n')
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}


def _setup(env, *args):
    return subprocess.run(["bash", str(SETUP_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


SETUP_ARGS = ("--project", "fake-project", "--region", "europe-west1", "--bucket", "gs://rtml-bucket")
SETUP_ARGS += ("--bigtable-instance=rtml-features",)
SERVICE_ACCOUNT = "rtml-dataflow@fake-project.iam.gserviceaccount.com"


@pytest.fixture
def setup_dry_run(no_cloud_tools) -> list[str]:
    done = _setup(no_cloud_tools, *SETUP_ARGS, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "was called" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("[dry-run] ") for line in lines), done.stdout
    return [line.removeprefix("[dry-run] ") for line in lines]


def test_setup_script_is_bash_with_strict_mode():
    text = SETUP_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SETUP_SCRIPT)], capture_output=True).returncode == 0


def test_setup_script_takes_the_shared_helpers_from_common_sh(no_cloud_tools, tmp_path):
    """shell_line, log and run live in templates/common.sh, sourced next to the script, whatever
    the working directory (schedule/schedule_retrain.sh sources the same file)."""
    common = TEMPLATES / "common.sh"
    assert subprocess.run(["bash", "-n", str(common)], capture_output=True).returncode == 0
    helpers = ("shell_line", "log", "run")
    for helper in helpers:
        assert re.search(rf"^{helper}\(\)", common.read_text(), re.M), helper
        assert not re.search(rf"^{helper}\(\)", SETUP_SCRIPT.read_text(), re.M), f"{helper} is defined in common.sh"
    assert 'source "$SCRIPT_DIR/common.sh"' in SETUP_SCRIPT.read_text()
    relative = os.path.relpath(SETUP_SCRIPT, tmp_path)
    done = subprocess.run(
        ["bash", relative, *SETUP_ARGS, "--dry-run"], cwd=tmp_path, env=no_cloud_tools, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "[dry-run] gcloud services enable " in done.stdout


def test_setup_dry_run_creates_every_topic_and_subscription_unless_they_exist(setup_dry_run):
    for topic in (config.TRANSACTIONS_TOPIC, config.FEEDBACK_TOPIC, config.INSIGHTS_TOPIC, config.DEAD_LETTER_TOPIC, config.HEALTH_TOPIC):
        subscription = config.subscription_for(topic)
        assert any(
            f"gcloud pubsub topics describe {topic} " in line and f"|| gcloud pubsub topics create {topic} " in line
            for line in setup_dry_run
        ), topic
        created = [line for line in setup_dry_run if f"|| gcloud pubsub subscriptions create {subscription} --topic={topic} " in line]
        assert len(created) == 1, subscription
        # the input subscriptions keep acknowledged messages, so `rtml seek` can replay them
        assert ("--retain-acked-messages" in created[0]) == (topic in config.INPUT_TOPICS), created[0]


def test_setup_dry_run_creates_the_feature_table_with_both_families_and_their_gc_rule(setup_dry_run):
    text = "\n".join(setup_dry_run)
    assert "gcloud bigtable instances create rtml-features --project=fake-project" in text
    assert "--cluster-config=id=rtml-features-c1,zone=europe-west1-b,nodes=1" in text
    families = []
    for family, days in config.FEATURE_FAMILIES.items():
        assert days == int(days)
        rule = f"maxage={int(days)}d"
        families.append(f"{family}:{rule}")
        assert (
            f"cbt -project=fake-project -instance=rtml-features setgcpolicy {config.FEATURES_TABLE} {family} {rule}"
            in text
        )
        assert f"createfamily {config.FEATURES_TABLE} {family}" in text
    assert (
        f"gcloud bigtable instances tables create {config.FEATURES_TABLE} --instance=rtml-features "
        f"--project=fake-project --column-families={','.join(families)}"
    ) in text


def test_setup_dry_run_creates_the_bucket_repository_and_service_account(setup_dry_run):
    text = "\n".join(setup_dry_run)
    assert "|| gcloud storage buckets create gs://rtml-bucket --project=fake-project --location=europe-west1" in text
    assert "|| gcloud artifacts repositories create rtml --repository-format=docker --location=europe-west1" in text
    assert f"gcloud iam service-accounts describe {SERVICE_ACCOUNT} --project=fake-project" in text
    assert "|| gcloud iam service-accounts create rtml-dataflow --project=fake-project" in text


def test_setup_dry_run_grants_the_worker_exactly_the_least_privilege_roles(setup_dry_run):
    member = f"--member=serviceAccount:{SERVICE_ACCOUNT}"
    expected = {
        ("gcloud projects add-iam-policy-binding fake-project", "roles/dataflow.worker"),
        ("gcloud pubsub subscriptions add-iam-policy-binding transactions-sub", "roles/pubsub.subscriber"),
        ("gcloud pubsub subscriptions add-iam-policy-binding transactions-sub", "roles/pubsub.viewer"),
        ("gcloud pubsub subscriptions add-iam-policy-binding fraud-feedback-sub", "roles/pubsub.subscriber"),
        ("gcloud pubsub subscriptions add-iam-policy-binding fraud-feedback-sub", "roles/pubsub.viewer"),
        ("gcloud pubsub topics add-iam-policy-binding fraud-insights", "roles/pubsub.publisher"),
        ("gcloud pubsub topics add-iam-policy-binding dead-letter", "roles/pubsub.publisher"),
        ("gcloud pubsub topics add-iam-policy-binding model-health", "roles/pubsub.publisher"),
        ("gcloud bigtable instances add-iam-policy-binding rtml-features", "roles/bigtable.user"),
        ("gcloud storage buckets add-iam-policy-binding gs://rtml-bucket", "roles/storage.objectAdmin"),
        ("gcloud artifacts repositories add-iam-policy-binding rtml", "roles/artifactregistry.reader"),
    }
    granted = set()
    for line in setup_dry_run:
        if "add-iam-policy-binding" in line:
            assert member in line, line
            role = re.search(r"--role=(\S+)", line).group(1)
            resource = line.split(" --", 1)[0]
            granted.add((resource, role))
    assert granted == expected


def test_setup_creates_only_what_is_missing(tmp_path):
    """Run for real against stand-in gcloud and cbt: everything exists but one topic and one family."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    (bin_dir / "gcloud").write_text(
        f'#!/bin/sh\necho "gcloud $*" >> "{calls}"\n'
        'case "$*" in *" describe fraud-insights "*) exit 1;; *" describe "*) exit 0;; esac\n'
    )
    (bin_dir / "cbt").write_text(
        f'#!/bin/sh\necho "cbt $*" >> "{calls}"\n'
        'case "$*" in *" ls features") printf "Family Name\\tGC Policy\\n---\\t---\\ntx\\tage() > 38d\\n";; esac\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = _setup({"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}, *SETUP_ARGS)
    assert done.returncode == 0, done.stderr
    log = calls.read_text().splitlines()
    created = [line for line in log if re.search(r" create(family)? ", line)]
    assert created == [
        "gcloud pubsub topics create fraud-insights --project=fake-project",
        "cbt -project=fake-project -instance=rtml-features createfamily features fb",
    ]
    assert sum("add-iam-policy-binding" in line for line in log) == 11
    assert sum(" setgcpolicy features " in line for line in log) == 2


def test_setup_help_explains_every_flag(no_cloud_tools):
    done = _setup(no_cloud_tools, "--help")
    assert done.returncode == 0
    for flag in ("--project", "--region", "--bucket", "--bigtable-instance", "--dry-run", "--help"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dry-run", "--projcet", "p"), "unknown option: --projcet"),
        (
            ("--dry-run", "--region", "r", "--bucket", "b", "--bigtable-instance", "rtml-features"),
            "--project is required",
        ),
        ((*SETUP_ARGS[:-1], "--bigtable-instance=Bad_Name", "--dry-run"), "--bigtable-instance must be"),
        (("--dry-run", "--project"), "--project needs a value"),
    ],
)
def test_setup_refuses_bad_flags_with_a_message(no_cloud_tools, args, message):
    done = _setup(no_cloud_tools, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert not done.stdout


def test_templates_readme_shows_how_to_run_every_template():
    readme = (TEMPLATES / "README.md").read_text()
    for name in TEMPLATE_NAMES:
        assert f"templates/{name}.json" in readme, name
    for needed in ("--update", "--transform-name-mappings", "gcloud dataflow jobs drain", "setup_gcp.sh"):
        assert needed in readme, needed
