"""Scheduled retraining (templates/schedule/): the Workflows definition, its deploy script, the Airflow DAG.

All offline. The workflow is run by a small interpreter of the Workflows subset it uses, against
a stand-in Dataflow API; the DAG is parsed with `ast` and also executed against stand-in Airflow
modules (Airflow is not installed here); the script runs with stand-in gcloud commands. Every
launch is checked against the templates' metadata.json: parameter names, required parameters,
and each value against the parameter's regexes or enum options, as Dataflow checks them.
"""

import ast
import datetime as dt
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tokenize
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
SCHEDULE = TEMPLATES / "schedule"
WORKFLOW_FILE = SCHEDULE / "retrain.workflow.yaml"
SCRIPT = SCHEDULE / "schedule_retrain.sh"
DAG_FILE = SCHEDULE / "retrain_dag.py"

LAUNCH = "googleapis.dataflow.v1b3.projects.locations.flexTemplates.launch"
GET_JOB = "googleapis.dataflow.v1b3.projects.locations.jobs.get"
# Fields of the Dataflow API's LaunchFlexTemplateParameter and FlexTemplateRuntimeEnvironment (v1b3).
LAUNCH_PARAMETER_FIELDS = {
    "jobName",
    "containerSpec",
    "containerSpecGcsPath",
    "parameters",
    "launchOptions",
    "environment",
    "update",
    "transformNameMappings",
}
ENVIRONMENT_FIELDS = {
    "additionalExperiments",
    "additionalPipelineOptions",
    "additionalUserLabels",
    "autoscalingAlgorithm",
    "diskSizeGb",
    "dumpHeapOnOom",
    "enableLauncherVmSerialPortLogging",
    "enableStreamingEngine",
    "flexrsGoal",
    "ipConfiguration",
    "kmsKeyName",
    "launcherMachineType",
    "machineType",
    "maxWorkers",
    "network",
    "numWorkers",
    "saveHeapDumpsToGcsPath",
    "sdkContainerImage",
    "serviceAccountEmail",
    "stagingLocation",
    "streamingMode",
    "subnetwork",
    "tempLocation",
    "workerRegion",
    "workerZone",
    "zone",
}
JOB_NAME = re.compile(r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?")  # Dataflow's rule for job names

# A fixed "now" for the workflow: Monday 2026-03-02 03:00:05.25 UTC, when the weekly schedule fires.
NOW = dt.datetime(2026, 3, 2, 3, 0, 5, 250000, tzinfo=dt.UTC)
EXECUTION_ID = "1a2b3c4d-0000-4000-8000-00000000abcd"


def _metadata(name: str) -> dict[str, dict]:
    metadata = json.loads((TEMPLATES / name / "metadata.json").read_text())
    return {param["name"]: param for param in metadata["parameters"]}


def _required(name: str) -> set[str]:
    return {param_name for param_name, param in _metadata(name).items() if not param["isOptional"]}


def _template_of(spec_path: str) -> str:
    """The template a spec path names: gs://BUCKET/templates/NAME.json, as templates/cloudbuild.yaml writes it."""
    match = re.fullmatch(r"gs://[^/]+/templates/([a-z][a-z0-9_]*)\.json", spec_path)
    assert match, f"not a template spec path of templates/cloudbuild.yaml: {spec_path}"
    assert (TEMPLATES / match.group(1) / "metadata.json").exists(), spec_path
    return match.group(1)


def _assert_launchable(template: str, parameters: dict[str, str]) -> None:
    """The checks Dataflow makes on a Flex Template launch's parameters, against metadata.json."""
    params = _metadata(template)
    unknown = set(parameters) - set(params)
    assert not unknown, f"{template}: {sorted(unknown)} are not parameters of templates/{template}/metadata.json"
    missing = _required(template) - set(parameters)
    assert not missing, f"{template}: required parameters {sorted(missing)} are not given"
    for name, value in parameters.items():
        assert isinstance(value, str), f"{template}.{name}: parameter values are strings, got {value!r}"
        for regex in params[name].get("regexes", []):
            assert re.fullmatch(regex, value), f"{template}.{name}={value!r} does not match {regex}"
        if params[name].get("paramType") == "ENUM":
            assert value in [option["value"] for option in params[name]["enumOptions"]], (name, value)


# --- a Workflows interpreter for the subset the workflow uses ---------------------------------


class WorkflowRaised(Exception):
    """A `raise` step, or a step that failed, ended the execution."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


class WorkflowExpressionError(WorkflowRaised):
    """An expression failed (a missing key, a type error): Workflows raises it at that step."""


class _Map(dict):
    """A Workflows map: `m.key` and `m["key"]`; a missing key is an error, as in Workflows."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"KeyError: key not found: {name}") from None


def _wrap(value):
    if isinstance(value, dict):
        return _Map({key: _wrap(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


def _python_expression(expression: str) -> str:
    """A Workflows expression as Python: the same operators; true, false and null renamed."""
    words = {"true": "True", "false": "False", "null": "None"}
    lines = expression.split("\n")
    for token in tokenize.generate_tokens(io.StringIO(expression).readline):
        if token.type == tokenize.NAME and token.string in words:
            (row, col), line = token.start, lines[token.start[0] - 1]
            lines[row - 1] = line[:col] + words[token.string] + line[col + len(token.string) :]
    return "\n".join(lines)


def _string(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise TypeError(f"string() of {value!r}")


def _map_get(mapping, key):
    if not isinstance(mapping, dict):
        raise TypeError(f"map.get on {mapping!r}")
    return mapping.get(key)


def _time_format(seconds, timezone=None) -> str:
    assert timezone in (None, "UTC", "Etc/UTC"), f"only UTC is modelled here, got {timezone}"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Workflow:
    """Runs a Workflows YAML definition: steps, assign, call, switch, next, return, raise,
    subworkflows; connectors and `sys.*` are the given stand-ins. Anything else is refused, so
    the workflow cannot silently use syntax this model does not check."""

    STEP_KEYS = {"assign", "call", "args", "result", "switch", "next", "return", "raise", "steps"}

    def __init__(self, definition: dict, connectors: dict, now: dt.datetime = NOW, execution_id: str = EXECUTION_ID):
        self.definition = definition
        self.connectors = connectors
        self.calls: list[tuple[str, dict]] = []
        self.env = {
            "GOOGLE_CLOUD_PROJECT_ID": "home-project",
            "GOOGLE_CLOUD_LOCATION": "europe-west4",
            "GOOGLE_CLOUD_WORKFLOW_ID": "rtml-retrain",
            "GOOGLE_CLOUD_WORKFLOW_EXECUTION_ID": execution_id,
        }
        self.stdlib = {
            "__builtins__": {},
            "sys": types.SimpleNamespace(now=now.timestamp, get_env=lambda name: self.env[name]),
            "time": types.SimpleNamespace(format=_time_format),
            "text": types.SimpleNamespace(
                substring=lambda source, start, end: source[start:end],
                replace_all=lambda source, old, new: source.replace(old, new),
            ),
            "map": types.SimpleNamespace(get=_map_get),
            "default": lambda value, fallback: fallback if value is None else value,
            "string": _string,
            "len": len,
        }

    def run(self, argument: dict | None):
        main = self.definition["main"]
        scope = {main["params"][0]: _wrap(argument)} if main.get("params") else {}
        return self._run_block(main["steps"], scope)

    def _value(self, value, scope):
        if isinstance(value, str):
            match = re.fullmatch(r"\$\{(.*)\}", value, re.S)
            if not match:
                assert "${" not in value, f"Workflows does not interpolate inside strings: {value}"
                return value
            try:
                return eval(_python_expression(match.group(1)), self.stdlib, scope)  # noqa: S307 - the repository's own file
            except (KeyError, TypeError, NameError, AttributeError, ZeroDivisionError) as err:
                raise WorkflowExpressionError(f"{value}: {err}") from err
        if isinstance(value, dict):
            return _Map({key: self._value(item, scope) for key, item in value.items()})
        if isinstance(value, list):
            return [self._value(item, scope) for item in value]
        return value

    def _run_block(self, steps: list, scope: dict):
        names = [next(iter(step)) for step in steps]
        assert len(names) == len(set(names)), f"duplicate step names: {names}"
        index = 0
        while index < len(steps):
            outcome = self._step(steps[index][names[index]], scope)
            if outcome is None:
                index += 1
            elif outcome[0] == "return":
                return outcome[1]
            elif outcome[1] == "end":
                return None
            else:
                assert outcome[1] in names, f"next: {outcome[1]} is not a step of this block"
                index = names.index(outcome[1])
        return None

    def _step(self, step: dict, scope: dict):
        assert set(step) <= self.STEP_KEYS, f"step keys not modelled here: {set(step) - self.STEP_KEYS}"
        for item in step.get("assign", []):
            ((name, value),) = item.items()
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), name
            scope[name] = self._value(value, scope)
        if "call" in step:
            result = self._call(step["call"], self._value(step.get("args", {}), scope))
            if "result" in step:
                scope[step["result"]] = _wrap(result)
        for case in step.get("switch", []):
            condition = self._value(case["condition"], scope)
            assert isinstance(condition, bool), f"a condition must be a boolean: {case['condition']} -> {condition!r}"
            if condition:
                outcome = self._step({key: item for key, item in case.items() if key != "condition"}, scope)
                if outcome is not None:
                    return outcome
                break
        if "steps" in step:
            result = self._run_block(step["steps"], scope)
            if result is not None:
                return ("return", result)
        if "raise" in step:
            raise WorkflowRaised(self._value(step["raise"], scope))
        if "return" in step:
            return ("return", self._value(step["return"], scope))
        if "next" in step:
            return ("next", step["next"])
        return None

    def _call(self, name: str, args: dict):
        self.calls.append((name, args))
        assert len(self.calls) < 500, "the workflow keeps calling: a job state it never leaves its loop on?"
        if name == "sys.sleep":
            assert set(args) == {"seconds"} and args["seconds"] > 0, args
            return None
        if name == "sys.log":
            assert set(args) <= {"text", "data", "severity"}, args
            return None
        if name in self.definition and name != "main":
            sub = self.definition[name]
            params = sub.get("params", [])
            assert set(args) == set(params), f"{name} takes {params}, called with {sorted(args)}"
            return self._run_block(sub["steps"], dict(args))
        assert name in self.connectors, f"the workflow calls {name}, which this test does not expect"
        return self.connectors[name](**args)


class FakeDataflow:
    """Flex Template launches and job states: each launched job reports `states` in turn."""

    def __init__(self, states_by_template: dict[str, list[str]] | None = None):
        self.states_by_template = states_by_template or {}
        self.launches: list[dict] = []
        self.jobs: dict[str, dict] = {}

    def connectors(self) -> dict:
        return {LAUNCH: self.launch, GET_JOB: self.get}

    def launch(self, projectId, location, body):  # noqa: N803 - the connector's argument names
        assert set(body) <= {"launchParameter", "validateOnly"}, body
        parameter = body["launchParameter"]
        template = _template_of(parameter["containerSpecGcsPath"])
        job_id = f"2026-03-02_03_00_{len(self.launches):02d}-{template}"
        states = list(
            self.states_by_template.get(template, ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_DONE"])
        )
        self.jobs[job_id] = {"name": parameter["jobName"], "states": states, "project": projectId, "location": location}
        self.launches.append({"template": template, "project": projectId, "location": location, **parameter})
        return {"job": {"id": job_id, "name": parameter["jobName"], "projectId": projectId, "location": location}}

    def get(self, projectId, location, jobId, view=None):  # noqa: N803
        job = self.jobs[jobId]
        assert (projectId, location) == (job["project"], job["location"]), "polled in another project or region"
        state = job["states"].pop(0) if len(job["states"]) > 1 else job["states"][0]
        return {"id": jobId, "name": job["name"], "currentState": state}

    def launched(self, template: str) -> dict:
        found = [launch for launch in self.launches if launch["template"] == template]
        assert len(found) == 1, f"{template} launched {len(found)} times"
        return found[0]


def _workflow_definition() -> dict:
    return yaml.safe_load(WORKFLOW_FILE.read_text())


def _run_workflow(argument, dataflow=None, **kwargs):
    dataflow = dataflow or FakeDataflow()
    workflow = Workflow(_workflow_definition(), dataflow.connectors(), **kwargs)
    return workflow.run(argument), dataflow, workflow


def _launch_steps(steps: list, found=None) -> dict[str, dict]:
    """Every flexTemplates.launch step of a block and its nested blocks, by step name."""
    found = {} if found is None else found
    for step in steps:
        ((name, body),) = step.items()
        if body.get("call") == LAUNCH:
            found[name] = body
        for nested in [body.get("steps", [])] + [case.get("steps", []) for case in body.get("switch", [])]:
            _launch_steps(nested, found)
    return found


# --- the workflow -----------------------------------------------------------------------------


def test_workflow_passes_only_template_parameters_and_every_required_one():
    definition = _workflow_definition()
    launches = {}
    for sub in definition.values():
        launches.update(_launch_steps(sub["steps"]))
    assert set(launches) == {"launch_backfill", "launch_train"}, sorted(launches)
    for step_name, step in launches.items():
        template = step_name.removeprefix("launch_")
        parameters = step["args"]["body"]["launchParameter"]["parameters"]
        unknown = set(parameters) - set(_metadata(template))
        assert not unknown, (
            f"{step_name} passes {sorted(unknown)}, not parameters of templates/{template}/metadata.json: "
            "Dataflow refuses the launch"
        )
        assert _required(template) <= set(parameters), _required(template) - set(parameters)


def test_workflow_backfills_without_state_then_trains_with_the_guard_on_that_folder():
    result, dataflow, workflow = _run_workflow({"bucket": "rtml-bucket"})
    assert [launch["template"] for launch in dataflow.launches] == ["backfill", "train"]
    backfill, train = dataflow.launched("backfill"), dataflow.launched("train")
    assert backfill["parameters"]["no_state"] == "true"
    assert train["parameters"]["publish_guard"] == "average_precision"
    assert train["parameters"]["examples"] == backfill["parameters"]["examples_out"]
    # a folder of this run's own, under the bucket; never the examples of an earlier run
    assert backfill["parameters"]["examples_out"] == "gs://rtml-bucket/retrain/20260222-1a2b3c4d"
    assert train["parameters"]["model_dir"] == "gs://rtml-bucket/models"
    assert result["examples"] == backfill["parameters"]["examples_out"]
    assert result["backfill_job"].endswith("-backfill") and result["train_job"].endswith("-train")
    assert result["refused_versions_in"] == "gs://rtml-bucket/models/.refused"
    # train starts only once backfill is done; each job polled until done, sleeping in between
    calls = [name for name, _ in workflow.calls if name != "sys.log"]
    first_train = calls.index(LAUNCH, 1)
    polls = ["wait_for_job", GET_JOB, "sys.sleep", GET_JOB, "sys.sleep", GET_JOB]
    assert calls[:first_train] == [LAUNCH, *polls]
    assert calls[first_train:] == [LAUNCH, *polls]
    assert all(args == {"seconds": 60} for name, args in workflow.calls if name == "sys.sleep")


def test_workflow_launches_are_valid_for_the_templates_and_the_api():
    _, dataflow, _ = _run_workflow({"bucket": "rtml-bucket", "project": "p1", "region": "us-east1"})
    for launch in dataflow.launches:
        template = launch["template"]
        parameters = {key: value for key, value in launch["parameters"].items() if key in _metadata(template)}
        _assert_launchable(template, parameters)
        fields = {key for key in launch if key not in ("template", "project", "location")}
        assert fields <= LAUNCH_PARAMETER_FIELDS, fields - LAUNCH_PARAMETER_FIELDS
        assert set(launch["environment"]) <= ENVIRONMENT_FIELDS, set(launch["environment"]) - ENVIRONMENT_FIELDS
        assert JOB_NAME.fullmatch(launch["jobName"]), launch["jobName"]
        assert (launch["project"], launch["location"]) == ("p1", "us-east1")
        assert launch["environment"]["serviceAccountEmail"] == "rtml-dataflow@p1.iam.gserviceaccount.com"
        assert launch["environment"]["tempLocation"] == "gs://rtml-bucket/tmp"
        assert launch["containerSpecGcsPath"] == f"gs://rtml-bucket/templates/{template}.json"
    assert isinstance(dataflow.launched("backfill")["environment"]["maxWorkers"], int)


# The training window: `days` days, both ends included, ending `label_delay_days` days before
# yesterday (UTC) at the time the run starts; by default 30 days ending 8 days before the run.
WINDOWS = [
    # now, days, label_delay_days (None: the defaults), train_start, train_end
    (NOW, None, None, "2026-01-24", "2026-02-22"),  # 30 days ending a week before yesterday
    (NOW, 7, None, "2026-02-16", "2026-02-22"),
    (NOW, 7, 0, "2026-02-23", "2026-03-01"),  # no delay: ending yesterday
    (NOW, None, 3, "2026-01-28", "2026-02-26"),
    (NOW, 3, 30, "2026-01-28", "2026-01-30"),
    (dt.datetime(2026, 3, 1, 0, 0, 1, tzinfo=dt.UTC), 3, None, "2026-02-19", "2026-02-21"),  # just after midnight
    (dt.datetime(2026, 3, 1, 0, 0, 1, tzinfo=dt.UTC), 3, 0, "2026-02-26", "2026-02-28"),
    (dt.datetime(2028, 3, 8, 23, 59, 59, tzinfo=dt.UTC), 30, None, "2028-01-31", "2028-02-29"),  # a leap year
    (dt.datetime(2028, 3, 1, 23, 59, 59, tzinfo=dt.UTC), 30, 0, "2028-01-31", "2028-02-29"),
]


def _window_arguments(days, label_delay_days) -> dict:
    given = {"days": days, "label_delay_days": label_delay_days}
    return {name: value for name, value in given.items() if value is not None}


def _local_window(now: dt.datetime, days, label_delay_days) -> tuple[str, str]:
    """The window `rtml retrain` takes with yesterday as the last day of data, and the same
    defaults as the command line (rtml/cli.py), which the recipes must share."""
    from rtml import cli, retrain

    defaults = cli.build_parser().parse_args(["retrain", "--model-dir", "m", "--input", "h.jsonl"])
    yesterday = now.date() - dt.timedelta(days=1)
    start, end = retrain.training_window(
        yesterday,
        defaults.days if days is None else days,
        defaults.label_delay_days if label_delay_days is None else label_delay_days,
    )
    return start.isoformat(), end.isoformat()


@pytest.mark.parametrize("now, days, label_delay_days, start, end", WINDOWS)
def test_workflow_window_is_the_days_ending_label_delay_days_before_yesterday_utc(
    now, days, label_delay_days, start, end
):
    argument = {"bucket": "rtml-bucket", **_window_arguments(days, label_delay_days)}
    result, dataflow, _ = _run_workflow(argument, now=now)
    train = dataflow.launched("train")["parameters"]
    assert (train["train_start"], train["train_end"]) == (start, end)
    assert (result["train_start"], result["train_end"]) == (start, end)
    assert result["label_delay_days"] == (7 if label_delay_days is None else label_delay_days)
    window = dt.date.fromisoformat(end) - dt.date.fromisoformat(start)
    assert window.days + 1 == (30 if days is None else days)  # both ends included
    yesterday = now.date() - dt.timedelta(days=1)
    assert (yesterday - dt.date.fromisoformat(end)).days == (7 if label_delay_days is None else label_delay_days)
    assert (start, end) == _local_window(now, days, label_delay_days)
    run = dataflow.launched("backfill")["parameters"]["examples_out"].rsplit("/", 1)[1]
    assert run.split("-")[0] == end.replace("-", "")  # RUN = the window's last day, YYYYMMDD, then the execution


def test_each_execution_gets_its_own_examples_folder_and_job_names():
    _, first, _ = _run_workflow({"bucket": "b1"}, execution_id="aaaaaaaa-1111-4111-8111-111111111111")
    _, second, _ = _run_workflow({"bucket": "b1"}, execution_id="bbbbbbbb-2222-4222-8222-222222222222")
    for template, key in (("backfill", "examples_out"), ("train", "examples")):
        assert first.launched(template)["parameters"][key] != second.launched(template)["parameters"][key]
        assert first.launched(template)["jobName"] != second.launched(template)["jobName"]


@pytest.mark.parametrize("state", ["JOB_STATE_FAILED", "JOB_STATE_CANCELLED"])
def test_a_failed_backfill_fails_the_workflow_and_train_never_starts(state):
    dataflow = FakeDataflow({"backfill": ["JOB_STATE_RUNNING", state]})
    with pytest.raises(WorkflowRaised) as raised:
        _run_workflow({"bucket": "rtml-bucket"}, dataflow)
    assert raised.value.value["state"] == state
    assert state in raised.value.value["message"]
    assert [launch["template"] for launch in dataflow.launches] == ["backfill"]


@pytest.mark.parametrize("state", ["JOB_STATE_FAILED", "JOB_STATE_CANCELLED"])
def test_a_failed_train_job_fails_the_workflow(state):
    dataflow = FakeDataflow({"train": ["JOB_STATE_PENDING", state]})
    with pytest.raises(WorkflowRaised) as raised:
        _run_workflow({"bucket": "rtml-bucket"}, dataflow)
    assert raised.value.value["state"] == state
    assert raised.value.value["job_id"].endswith("-train")


@pytest.mark.parametrize(
    "argument, message",
    [
        ({}, "bucket is required"),
        ({"bucket": "b", "days": 2}, "days must be at least 3"),
        ({"bucket": "b", "label_delay_days": -1}, "label_delay_days must be a whole number of days, 0 or more"),
        ({"bucket": "b", "label_delay_days": 1.5}, "label_delay_days must be a whole number of days, 0 or more"),
    ],
)
def test_workflow_refuses_bad_arguments_before_launching_anything(argument, message):
    dataflow = FakeDataflow()
    with pytest.raises(WorkflowRaised) as raised:
        _run_workflow(argument, dataflow)
    assert raised.type is WorkflowRaised, f"not the workflow's own raise step: {raised.value}"
    assert message in raised.value.value
    assert not dataflow.launches


def test_workflow_arguments_override_every_default():
    argument = {
        "bucket": "b",
        "project": "p",
        "region": "r1",
        "days": 10,
        "label_delay_days": 2,
        "input": "gs://other/replay.jsonl",
        "model_dir": "gs://models-bucket/fraud",
        "work_dir": "gs://b/work",
        "examples_root": "gs://b/ex",
        "backfill_template": "gs://b/templates/backfill.json",
        "train_template": "gs://b/templates/train.json",
        "bigtable_instance": "other-instance",
        "service_account": "worker@p.iam.gserviceaccount.com",
        "backfill_max_workers": 3,
        "train_machine_type": "n2-highmem-8",
        "poll_seconds": 5,
    }
    _, dataflow, workflow = _run_workflow(argument)
    backfill, train = dataflow.launched("backfill"), dataflow.launched("train")
    assert (backfill["project"], backfill["location"]) == ("p", "r1")
    assert (train["parameters"]["train_start"], train["parameters"]["train_end"]) == ("2026-02-18", "2026-02-27")
    assert backfill["parameters"]["input"] == "gs://other/replay.jsonl"
    assert backfill["parameters"]["bigtable_instance"] == "other-instance"
    assert backfill["parameters"]["examples_out"].startswith("gs://b/ex/")
    assert backfill["environment"]["maxWorkers"] == 3
    assert train["parameters"]["model_dir"] == "gs://models-bucket/fraud"
    assert train["parameters"]["work_dir"] == "gs://b/work"
    assert train["environment"]["machineType"] == "n2-highmem-8"
    assert train["environment"]["serviceAccountEmail"] == "worker@p.iam.gserviceaccount.com"
    assert all(args == {"seconds": 5} for name, args in workflow.calls if name == "sys.sleep")
    read = set(re.findall(r'map\.get\(args, "(\w+)"\)', WORKFLOW_FILE.read_text()))
    assert read == set(argument), f"arguments the workflow reads but this test does not set: {read - set(argument)}"


# --- the backfill template for retraining -----------------------------------------------------


def test_backfill_template_can_skip_feature_state():
    """Retraining runs backfill with no_state, so the template must offer it as a parameter the
    launcher can pass as `--no_state=true` (the launcher passes every parameter as name=value)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines.backfill import BackfillOptions

    assert "no_state" in _metadata("backfill"), (
        "templates/backfill/metadata.json has no no_state parameter: a retraining launch with "
        "no_state is refused, and without it the backfill overwrites the scorer's Bigtable feature state"
    )
    for value, expected in (("true", True), ("false", False)):
        try:
            parsed = PipelineOptions([f"--no_state={value}"]).view_as(BackfillOptions).no_state
        except SystemExit:
            pytest.fail(f"beam_pipelines.backfill does not parse --no_state={value}, the form the launcher passes")
        assert parsed is expected


# --- schedule_retrain.sh ----------------------------------------------------------------------

SCRIPT_ARGS = ("--project", "fake-project", "--region", "europe-west1", "--bucket=gs://rtml-bucket/")
RETRAIN_SA = "rtml-retrain@fake-project.iam.gserviceaccount.com"
WORKER_SA = "rtml-dataflow@fake-project.iam.gserviceaccount.com"


@pytest.fixture
def no_gcloud(tmp_path) -> dict[str, str]:
    """An environment whose gcloud fails loudly: a dry run must not call it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "gcloud"
    stub.write_text('#!/bin/sh\necho "gcloud was called: $*" >&2\nexit 97\n')
    stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}


def _script(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def _dry_run(env, *args) -> tuple[list[str], str]:
    done = _script(env, *SCRIPT_ARGS, *args, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "was called" not in done.stderr
    commands = [line.removeprefix("[dry-run] ") for line in done.stdout.splitlines() if line.startswith("[dry-run] ")]
    assert commands
    return commands, done.stdout


def test_script_is_bash_with_strict_mode_and_parses():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_script_takes_the_shared_helpers_from_templates_common_sh(no_gcloud, tmp_path):
    text = SCRIPT.read_text()
    assert 'source "$SCRIPT_DIR/../common.sh"' in text
    for helper in ("shell_line", "log", "run"):
        assert not re.search(rf"^{helper}\(\)", text, re.M), f"{helper} is defined in templates/common.sh"
    # found next to the script, whatever the working directory and however the script path is given
    relative = os.path.relpath(SCRIPT, tmp_path)
    done = subprocess.run(
        ["bash", relative, *SCRIPT_ARGS, "--dry-run"], cwd=tmp_path, env=no_gcloud, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "[dry-run] gcloud workflows deploy rtml-retrain " in done.stdout


def test_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_dry_run_deploys_the_workflow_and_schedules_it(no_gcloud):
    commands, _ = _dry_run(no_gcloud)
    deploys = [line for line in commands if line.startswith("gcloud workflows deploy rtml-retrain ")]
    assert len(deploys) == 1
    assert f"--source={WORKFLOW_FILE}" in deploys[0]
    assert f"--service-account={RETRAIN_SA}" in deploys[0]
    assert "--location=europe-west1 --project=fake-project" in deploys[0]
    scheduler = [line for line in commands if "gcloud scheduler jobs create http rtml-retrain " in line]
    assert len(scheduler) == 1
    assert "gcloud scheduler jobs update http rtml-retrain " in scheduler[0]
    assert "'--schedule=0 3 * * 1' --time-zone=Etc/UTC" in scheduler[0]
    uri = "https://workflowexecutions.googleapis.com/v1/projects/fake-project/locations/europe-west1/workflows/rtml-retrain/executions"
    assert f"--uri={uri}" in scheduler[0]
    assert f"--oauth-service-account-email={RETRAIN_SA}" in scheduler[0]
    assert commands.index(deploys[0]) < commands.index(scheduler[0])
    assert any("|| gcloud iam service-accounts create rtml-retrain --project=fake-project" in line for line in commands)
    assert not any("add-iam-policy-binding" in line for line in commands), "roles are granted only with --grant-roles"


def test_dry_run_names_the_roles_the_account_needs(no_gcloud):
    _, stdout = _dry_run(no_gcloud)
    roles = stdout[stdout.index("needs these roles") :]
    for role in (
        "roles/workflows.invoker",
        "roles/dataflow.developer",
        "roles/iam.serviceAccountUser",
        "roles/storage.objectViewer",
    ):
        assert role in roles, role
    assert (
        f"gcloud iam service-accounts add-iam-policy-binding {WORKER_SA} --project=fake-project "
        f"--member=serviceAccount:{RETRAIN_SA} --role=roles/iam.serviceAccountUser"
    ) in roles
    assert (
        f"gcloud storage buckets add-iam-policy-binding gs://rtml-bucket --member=serviceAccount:{RETRAIN_SA}" in roles
    )


def test_grant_roles_grants_exactly_the_listed_roles(no_gcloud):
    commands, _ = _dry_run(no_gcloud, "--grant-roles")
    granted = {
        (line.split(" --", 1)[0], re.search(r"--role=(\S+)", line).group(1))
        for line in commands
        if "add-iam-policy-binding" in line
    }
    assert all(f"--member=serviceAccount:{RETRAIN_SA}" in line for line in commands if "add-iam-policy-binding" in line)
    assert granted == {
        ("gcloud projects add-iam-policy-binding fake-project", "roles/workflows.invoker"),
        ("gcloud projects add-iam-policy-binding fake-project", "roles/dataflow.developer"),
        ("gcloud projects add-iam-policy-binding fake-project", "roles/logging.logWriter"),
        (f"gcloud iam service-accounts add-iam-policy-binding {WORKER_SA}", "roles/iam.serviceAccountUser"),
        ("gcloud storage buckets add-iam-policy-binding gs://rtml-bucket", "roles/storage.objectViewer"),
    }


def test_schedule_and_window_are_overridable(no_gcloud):
    commands, _ = _dry_run(no_gcloud)
    scheduler = next(line for line in commands if "gcloud scheduler jobs create http" in line)
    assert '\\"days\\": 30, \\"label_delay_days\\": 7,' in scheduler  # the defaults
    commands, _ = _dry_run(
        no_gcloud, "--schedule", "30 2 * * *", "--time-zone=Europe/Amsterdam", "--days", "14", "--label-delay-days", "0"
    )
    scheduler = next(line for line in commands if "gcloud scheduler jobs create http" in line)
    assert "'--schedule=30 2 * * *' --time-zone=Europe/Amsterdam" in scheduler
    assert '\\"days\\": 14, \\"label_delay_days\\": 0,' in scheduler


def _recording_gcloud(tmp_path, scheduler_job_exists: bool) -> tuple[dict[str, str], Path]:
    """A gcloud that records each call's arguments, one JSON list a line; `describe` finds
    everything but, unless told otherwise, the scheduler job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    record = f'{sys.executable} -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> "{calls}"\n'
    job_describe = "exit 0" if scheduler_job_exists else "exit 1"
    (bin_dir / "gcloud").write_text(
        "#!/bin/sh\n"
        + record
        + f'case "$*" in "scheduler jobs describe "*) {job_describe};; *" describe "*) exit 0;; esac\n'
    )
    (bin_dir / "gcloud").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}, calls


def _calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flag(call: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (name, call)
    return values[0]


@pytest.mark.parametrize("exists", [False, True])
def test_script_creates_the_scheduler_job_or_updates_it(tmp_path, exists):
    env, calls_file = _recording_gcloud(tmp_path, scheduler_job_exists=exists)
    done = _script(env, *SCRIPT_ARGS)
    assert done.returncode == 0, done.stderr
    calls = _calls(calls_file)
    verb = "update" if exists else "create"
    jobs = [call for call in calls if call[:3] == ["scheduler", "jobs", verb]]
    assert len(jobs) == 1 and jobs[0][3:5] == ["http", "rtml-retrain"]
    assert not any(call[:3] == ["scheduler", "jobs", "create" if exists else "update"] for call in calls)
    assert not any(call[:3] == ["iam", "service-accounts", "create"] for call in calls)  # it exists
    assert any(call[:3] == ["workflows", "deploy", "rtml-retrain"] for call in calls)


def test_the_scheduled_execution_runs_the_workflow_end_to_end(tmp_path):
    """The scheduler job's request body, as the script passes it to gcloud, run through the workflow."""
    env, calls_file = _recording_gcloud(tmp_path, scheduler_job_exists=False)
    done = _script(env, *SCRIPT_ARGS, "--days=21", "--label-delay-days=03", "--bigtable-instance", "rtml-features")
    assert done.returncode == 0, done.stderr
    job = next(call for call in _calls(calls_file) if call[:3] == ["scheduler", "jobs", "create"])
    assert _flag(job, "http-method") == "POST"
    request = json.loads(_flag(job, "message-body"))
    assert set(request) <= {"argument", "callLogLevel"} and isinstance(request["argument"], str)
    argument = json.loads(request["argument"])  # the Workflow Executions API takes it JSON-encoded
    assert (argument["days"], argument["label_delay_days"]) == (21, 3)  # JSON numbers, as the workflow reads them
    read = set(re.findall(r'map\.get\(args, "(\w+)"\)', WORKFLOW_FILE.read_text()))
    assert set(argument) <= read, f"the script passes arguments the workflow never reads: {set(argument) - read}"
    result, dataflow, _ = _run_workflow(argument)
    backfill, train = dataflow.launched("backfill"), dataflow.launched("train")
    assert (backfill["project"], backfill["location"]) == ("fake-project", "europe-west1")
    assert backfill["containerSpecGcsPath"] == "gs://rtml-bucket/templates/backfill.json"
    assert backfill["parameters"]["input"] == "gs://rtml-bucket/history/history.jsonl"
    assert backfill["environment"]["serviceAccountEmail"] == WORKER_SA
    assert train["parameters"]["model_dir"] == "gs://rtml-bucket/models"
    # 21 days, both ends included, ending 3 days before yesterday (2026-03-01)
    assert (result["train_start"], result["train_end"]) == ("2026-02-06", "2026-02-26")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dry-run", "--projcet", "p"), "unknown option: --projcet"),
        (("--dry-run", "--region", "r", "--bucket", "b"), "--project is required"),
        ((*SCRIPT_ARGS, "--days=2", "--dry-run"), "--days must be"),
        ((*SCRIPT_ARGS, "--days=x", "--dry-run"), "--days must be"),
        ((*SCRIPT_ARGS, "--label-delay-days=-1", "--dry-run"), "--label-delay-days must be"),
        ((*SCRIPT_ARGS, "--label-delay-days", "7.5", "--dry-run"), "--label-delay-days must be"),
        ((*SCRIPT_ARGS, "--label-delay-days=", "--dry-run"), "--label-delay-days must be"),
        ((*SCRIPT_ARGS, "--schedule=weekly", "--dry-run"), "--schedule must be"),
        (("--dry-run", "--project", "p", "--region", "r", "--bucket", "b/models"), "not a path"),
        (("--dry-run", "--project"), "--project needs a value"),
    ],
)
def test_script_refuses_bad_flags_with_a_message(no_gcloud, args, message):
    done = _script(no_gcloud, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert not done.stdout


def test_script_help_explains_every_flag(no_gcloud):
    done = _script(no_gcloud, "--help")
    assert done.returncode == 0
    for flag in (
        "--project",
        "--region",
        "--bucket",
        "--schedule",
        "--days",
        "--label-delay-days",
        "--service-account",
        "--dry-run",
    ):
        assert flag in done.stdout, flag


# --- the Airflow DAG --------------------------------------------------------------------------


def _dag_tree() -> ast.Module:
    return ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))


def _operator_calls(tree: ast.Module) -> dict[str, ast.Call]:
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DataflowStartFlexTemplateOperator":
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            calls[ast.literal_eval(keywords["task_id"])] = node
    return calls


def _keyword(call: ast.Call, name: str) -> ast.expr:
    return next(keyword.value for keyword in call.keywords if keyword.arg == name)


def _dict_entry(node: ast.expr, key: str) -> ast.expr:
    assert isinstance(node, ast.Dict), ast.dump(node)
    for k, value in zip(node.keys, node.values, strict=True):
        if isinstance(k, ast.Constant) and k.value == key:
            return value
    raise AssertionError(f"no {key!r} in {ast.unparse(node)}")


def _dag_parameters(call: ast.Call) -> ast.Dict:
    parameters = _dict_entry(_dict_entry(_keyword(call, "body"), "launchParameter"), "parameters")
    assert isinstance(parameters, ast.Dict) and all(isinstance(key, ast.Constant) for key in parameters.keys)
    return parameters


def test_dag_imports_airflow_2_and_the_flex_template_operator():
    imports = {
        (node.module, alias.name)
        for node in ast.walk(_dag_tree())
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert ("airflow", "DAG") in imports
    assert ("airflow.providers.google.cloud.operators.dataflow", "DataflowStartFlexTemplateOperator") in imports
    assert ("airflow.models", "Variable") in imports


def test_dag_passes_only_template_parameters_and_every_required_one():
    calls = _operator_calls(_dag_tree())
    assert set(calls) == {"backfill", "train"}
    for template, call in calls.items():
        names = {key.value for key in _dag_parameters(call).keys}
        unknown = names - set(_metadata(template))
        assert not unknown, (
            f"task {template} passes {sorted(unknown)}, not parameters of templates/{template}/metadata.json"
        )
        assert _required(template) <= names, _required(template) - names


def test_dag_backfills_without_state_then_trains_with_the_guard_on_that_folder():
    tree = _dag_tree()
    calls = _operator_calls(tree)
    for call in calls.values():
        assert ast.literal_eval(_keyword(call, "wait_until_finished")) is True
    backfill, train = _dag_parameters(calls["backfill"]), _dag_parameters(calls["train"])
    assert ast.literal_eval(_dict_entry(backfill, "no_state")) == "true"
    assert ast.literal_eval(_dict_entry(train, "publish_guard")) == "average_precision"
    assert ast.dump(_dict_entry(train, "examples")) == ast.dump(_dict_entry(backfill, "examples_out"))
    dependencies = [
        (node.value.left.id, node.value.right.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.RShift)
    ]
    assert dependencies == [("backfill", "train")]


def test_dag_configuration_is_one_dict_of_defaults_read_from_an_airflow_variable():
    tree = _dag_tree()
    top = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    defaults = ast.literal_eval(top["DEFAULTS"])
    assert {"project", "region", "bucket", "days", "schedule"} <= set(defaults)
    assert defaults["days"] == 30 and defaults["schedule"] == "0 3 * * 1"
    assert defaults["label_delay_days"] == 7
    variable_gets = [
        node
        for node in ast.walk(top["CONFIG"])
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "Variable.get"
    ]
    assert len(variable_gets) == 1 and {k.arg for k in variable_gets[0].keywords} >= {"default_var", "deserialize_json"}
    first_dag = next(index for index, node in enumerate(tree.body) if isinstance(node, ast.With))
    config_at = next(
        index
        for index, node in enumerate(tree.body)
        if isinstance(node, ast.Assign) and top.get("CONFIG") is node.value
    )
    assert config_at < first_dag


def _load_dag(monkeypatch, variable: dict | None = None) -> dict[str, object]:
    """Execute the DAG file with stand-ins for the Airflow modules; returns the operators by task id."""
    operators = {}

    class Operator:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.downstream = []
            operators[kwargs["task_id"]] = self

        def __rshift__(self, other):
            self.downstream.append(other)
            return other

    class DAG:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Variable:
        @staticmethod
        def get(key, default_var=None, deserialize_json=False):
            assert key == "rtml_retrain" and deserialize_json
            return default_var if variable is None else variable

    modules = {
        "airflow": types.ModuleType("airflow"),
        "airflow.models": types.ModuleType("airflow.models"),
        "airflow.providers": types.ModuleType("airflow.providers"),
        "airflow.providers.google": types.ModuleType("airflow.providers.google"),
        "airflow.providers.google.cloud": types.ModuleType("airflow.providers.google.cloud"),
        "airflow.providers.google.cloud.operators": types.ModuleType("airflow.providers.google.cloud.operators"),
        "airflow.providers.google.cloud.operators.dataflow": types.ModuleType("dataflow"),
        "pendulum": types.ModuleType("pendulum"),
    }
    modules["airflow"].DAG = DAG
    modules["airflow.models"].Variable = Variable
    modules["airflow.providers.google.cloud.operators.dataflow"].DataflowStartFlexTemplateOperator = Operator
    modules["pendulum"].datetime = lambda *args, tz: dt.datetime(*args, tzinfo=dt.UTC if tz == "UTC" else None)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    namespace = runpy.run_path(str(DAG_FILE))
    operators["dag"] = namespace["dag"]
    return operators


def _render(value, data_interval_end: dt.datetime):
    """Airflow's rendering of a templated field, for the Jinja this DAG uses: variables, filters, macros.ds_add."""
    if isinstance(value, dict):
        return {key: _render(item, data_interval_end) for key, item in value.items()}
    if not isinstance(value, str):
        return value

    def ds_add(ds: str, days: int) -> str:
        return (dt.date.fromisoformat(ds) + dt.timedelta(days=days)).isoformat()

    context = {
        "__builtins__": {},
        "data_interval_end": data_interval_end,
        "ds": lambda moment: moment.strftime("%Y-%m-%d"),
        "ds_nodash": lambda moment: moment.strftime("%Y%m%d"),
        "macros": types.SimpleNamespace(ds_add=ds_add),
    }

    def expression(match) -> str:
        python = match.group(1)
        while re.search(r"([A-Za-z_][\w.]*)\s*\|\s*(\w+)", python):
            python = re.sub(r"([A-Za-z_][\w.]*)\s*\|\s*(\w+)", r"\2(\1)", python, count=1)
        return str(eval(python, context))  # noqa: S307 - the repository's own templates

    return re.sub(r"\{\{(.*?)\}\}", expression, value)


def test_dag_renders_the_window_and_valid_launches(monkeypatch):
    operators = _load_dag(monkeypatch)
    assert operators["backfill"].downstream == [operators["train"]]
    assert operators["dag"].kwargs["schedule"] == "0 3 * * 1"
    end_of_interval = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC)  # the Monday run
    rendered = {task: _render(operators[task].kwargs["body"], end_of_interval) for task in ("backfill", "train")}
    for task, body in rendered.items():
        launch = body["launchParameter"]
        assert _template_of(launch["containerSpecGcsPath"]) == task
        parameters = {key: value for key, value in launch["parameters"].items() if key in _metadata(task)}
        _assert_launchable(task, parameters)
        assert set(launch) <= LAUNCH_PARAMETER_FIELDS and set(launch["environment"]) <= ENVIRONMENT_FIELDS
        assert JOB_NAME.fullmatch(launch["jobName"] + "-1a2b3c4d"), launch["jobName"]  # plus the operator's suffix
        assert operators[task].kwargs["wait_until_finished"] is True
        assert operators[task].kwargs["deferrable"] is False
    train = rendered["train"]["launchParameter"]["parameters"]
    assert (train["train_start"], train["train_end"]) == ("2026-01-24", "2026-02-22")  # 30 days, a week before Sunday
    assert train["examples"] == rendered["backfill"]["launchParameter"]["parameters"]["examples_out"]
    assert train["examples"] == "gs://my-rtml-bucket/retrain/20260302"


def test_dag_takes_its_configuration_from_the_variable(monkeypatch):
    operators = _load_dag(monkeypatch, {"project": "p2", "region": "asia-south1", "bucket": "gs://b2/", "days": 14})
    train = operators["train"]
    assert (train.kwargs["project_id"], train.kwargs["location"]) == ("p2", "asia-south1")
    body = _render(train.kwargs["body"], dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC))["launchParameter"]
    assert body["containerSpecGcsPath"] == "gs://b2/templates/train.json"
    assert (body["parameters"]["train_start"], body["parameters"]["train_end"]) == ("2026-02-09", "2026-02-22")
    assert body["environment"]["serviceAccountEmail"] == "rtml-dataflow@p2.iam.gserviceaccount.com"


@pytest.mark.parametrize("now, days, label_delay_days, start, end", WINDOWS)
def test_dag_window_matches_the_workflow_and_rtml_retrain(monkeypatch, now, days, label_delay_days, start, end):
    """The same windows as the workflow's: a run's data interval ends when the run starts."""
    operators = _load_dag(monkeypatch, _window_arguments(days, label_delay_days))
    parameters = _render(operators["train"].kwargs["body"], now)["launchParameter"]["parameters"]
    assert (parameters["train_start"], parameters["train_end"]) == (start, end)
    assert (start, end) == _local_window(now, days, label_delay_days)


def test_the_recipes_default_label_delay_is_the_simulators_feedback_delay(no_gcloud):
    from rtml.simulator import SimulationConfig

    delay = SimulationConfig().feedback_delay_days
    assert delay == 7
    result, _, _ = _run_workflow({"bucket": "b"})
    assert result["label_delay_days"] == delay
    top = {
        target.id: node.value
        for node in _dag_tree().body
        if isinstance(node, ast.Assign)
        for target in node.targets
    }
    assert ast.literal_eval(top["DEFAULTS"])["label_delay_days"] == delay
    usage = _script(no_gcloud, "--help").stdout
    flag = usage[usage.index("  --label-delay-days") :]
    assert f"(default: {int(delay)})" in flag[: flag.index("\n  --", 1)]


def test_dag_refuses_a_window_too_short_to_train(monkeypatch):
    with pytest.raises(ValueError, match="days must be at least 3"):
        _load_dag(monkeypatch, {"days": 2})


@pytest.mark.parametrize("label_delay_days", [-1, 1.5, "7", True])
def test_dag_refuses_a_label_delay_that_is_not_a_whole_number_of_days(monkeypatch, label_delay_days):
    with pytest.raises(ValueError, match="label_delay_days must be a whole number of days, 0 or more"):
        _load_dag(monkeypatch, {"label_delay_days": label_delay_days})
