"""The GPU image's pins, checked without Docker or a GPU (issue 26 item 2).

The image once kept its base image's torch 2.5.1 while transformers 5 disables PyTorch below 2.6, so
`CLIPTextModel` was unusable and every start failed. These checks tie the image's torch to pyproject's floor,
the floor to what transformers and diffusers declare, and the TensorRT extra to the torch build's CUDA major.
"""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from engine.backends.tensorrt import tensorrt_extra

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile.gpu").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def build_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile.gpu has no default for ARG {name}"
    return match.group(1)


def torch_floor() -> Version:
    """The lowest torch the project allows (the `>=` bound of its one torch requirement)."""
    requirements = [Requirement(item) for item in re.findall(r'^\s*"(torch[<>=!~ ].*?)",', PYPROJECT, re.MULTILINE)]
    assert len(requirements) == 1, requirements
    floors = [Version(spec.version) for spec in requirements[0].specifier if spec.operator == ">="]
    assert floors, f"pyproject's {requirements[0]} has no lower bound"
    return max(floors)


def torch_needed_by(distribution: str) -> Version:
    """The lowest torch `distribution` (installed here) declares for its torch extra."""
    needed = [Requirement(item) for item in requires(distribution) or [] if Requirement(item).name == "torch"]
    assert needed, f"{distribution} declares no torch requirement"
    return max(Version(spec.version) for requirement in needed for spec in requirement.specifier
               if spec.operator == ">=")


def test_the_images_torch_satisfies_the_projects_floor():
    assert Version(build_arg("TORCH_VERSION")) >= torch_floor()
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' \
        in DOCKERFILE  # the CUDA build is installed first, so the project's requirement keeps it


@pytest.mark.parametrize("distribution", ["transformers", "diffusers"])
def test_the_floor_satisfies_transformers_and_diffusers(distribution):
    assert torch_floor() >= torch_needed_by(distribution), (
        f"{distribution} needs torch >= {torch_needed_by(distribution)}; pyproject allows {torch_floor()}")


def test_the_tensorrt_extra_matches_the_images_cuda_major():
    cuda = build_arg("TORCH_CUDA")
    assert re.fullmatch(r"cu\d{3}", cuda), cuda
    version = f"{cuda[2:-1]}.{cuda[-1]}"  # cu130 -> 13.0, cu128 -> 12.8
    assert build_arg("TRT_EXTRA") == tensorrt_extra(version)
    assert re.search(rf'^{build_arg("TRT_EXTRA")} = \[', PYPROJECT, re.MULTILINE), "no such extra in pyproject"
    assert '".[server,${TRT_EXTRA}]"' in DOCKERFILE and "--extra-index-url https://pypi.nvidia.com" in DOCKERFILE


def test_the_health_check_waits_for_engine_builds():
    period = re.search(r"--start-period=(\d+)s", DOCKERFILE)
    assert period and int(period.group(1)) >= 900, "engine builds take minutes per shape on first start"
