"""beam-rtml: portable Apache Beam pipelines for real-time ML (card fraud detection)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def pinned_requirements() -> list[str]:
    """The runtime pins of requirements.txt, the single place they are written."""
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


setup(
    name="beam-rtml",
    version="0.1.0",
    description="Portable Apache Beam pipelines for real-time machine learning: card fraud detection",
    python_requires=">=3.10,<3.13",
    packages=find_packages(
        include=[
            "rtml",
            "rtml.*",
            "beam_pipelines",
            "beam_pipelines.*",
            "transforms",
            "transforms.*",
            "models",
            "models.*",
        ]
    ),
    install_requires=pinned_requirements(),
    entry_points={"console_scripts": ["rtml = rtml.cli:main"]},
)
