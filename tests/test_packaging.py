"""One set of pins; the layout and console script the contract promises."""

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def test_every_runtime_dependency_is_pinned_exactly():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.]*", line), line


def test_the_required_stack_is_pinned_at_the_required_versions():
    pins = _pins(ROOT / "requirements.txt")
    assert pins["apache-beam"] == "2.77.0"
    assert pins["tensorflow"] == "2.21.0"
    assert pins["tensorflow-transform"] == "1.21.0"
    for name in ("tensorflow-hub", "google-cloud-pubsub", "google-cloud-bigtable", "tqdm", "rich"):
        assert name in pins


def test_installed_package_declares_the_same_pins_as_requirements_txt():
    declared = importlib.metadata.requires("beam-rtml")
    assert declared is not None
    as_pins = {}
    for requirement in declared:
        name, version = requirement.split(";")[0].strip().split("==")
        as_pins[re.sub(r"\[.*\]", "", name).lower()] = version
    assert as_pins == _pins(ROOT / "requirements.txt")


def test_installed_versions_match_the_pins():
    for name, version in _pins(ROOT / "requirements.txt").items():
        assert importlib.metadata.version(name) == version, name


def test_rtml_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("rtml") == "rtml.cli:main"


def test_fixed_layout_exists():
    for folder in ("beam_pipelines", "transforms", "models", "templates", "tests"):
        assert (ROOT / folder).is_dir(), folder
    for file in ("setup.py", "requirements.txt", "Makefile", ".ci/run", "README.md"):
        assert (ROOT / file).is_file(), file
    assert "make test" in (ROOT / ".ci" / "run").read_text()
