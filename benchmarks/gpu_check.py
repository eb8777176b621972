"""`python -m benchmarks.gpu_check` (`make gpu-check`): a CUDA machine's readiness in one JSON report.

Runs, each in its own process with its output shown live: the doctor (`python -m engine.doctor`), the
CUDA-marked tests (`pytest -m cuda`) and the TensorRT benchmark at 512x512 (`python -m
benchmarks.engine --backend tensorrt --size 512 --device cuda --dtype float16`, on sd-turbo when the
model hub or the local hub cache has it, else on the built-in tiny model). Each step's command, exit
status, duration and results (the doctor's and the benchmark's JSON, the test counts) go into one
report (`out/gpu-check.json` by default). Exit status 0 only when every step passed.

On a machine where torch sees no CUDA GPU, or where TensorRT does not import, it stops at once with the reason,
the fix and status 2: none of these steps can say anything there (`python -m engine.doctor` is the check for a
CPU machine; `make gpu-setup` installs the TensorRT extra for torch's CUDA). Each step has a time bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from .report import start_logging, write_json

logger = logging.getLogger(__name__)

HUB_MODEL = "stabilityai/sd-turbo"
FALLBACK_MODEL = "tiny"
# sd-turbo runs with the tiny VAE, which comes from the hub too (`engine.models.DEFAULT_TAESD`).
HUB_REPOS = (HUB_MODEL, "madebyollin/taesd")
SIZE = 512
#: Each step's bound in seconds: the doctor runs a few frames; the tests and the benchmark build TensorRT engines
#: (minutes each for a full-size UNet). Past its bound a step is stopped and reported failed.
STEP_TIMEOUTS_S = {"doctor": 15 * 60, "cuda_tests": 45 * 60, "tensorrt_benchmark": 60 * 60}


@dataclass(frozen=True)
class Step:
    """One command of the check and the JSON file it writes (None when it writes none)."""

    name: str
    command: list[str]
    output: Path | None

    @property
    def timeout_s(self) -> float:
        """How long the step may run."""
        return STEP_TIMEOUTS_S[self.name]


def cuda_unavailable_reason() -> str | None:
    """Why this machine cannot run the GPU check, or None when torch sees a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build and this machine has no CUDA GPU for it"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the NVIDIA driver "
            "(`nvidia-smi`) and CUDA_VISIBLE_DEVICES")


def tensorrt_missing_fix() -> str | None:
    """The fix when TensorRT (or polygraphy) cannot be imported here, None when it can: without it the TensorRT
    tests skip and the TensorRT benchmark fails, so the check would say nothing."""
    import torch

    from engine.backends.tensorrt import tensorrt_install

    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError (OSError for a missing libnvinfer)
        return (f"TensorRT does not import ({type(error).__name__}: {error}). Install "
                f"{tensorrt_install(torch.version.cuda)}; `make gpu-setup` does it")
    return None


def hub_has(repo: str, timeout_s: float = 10.0) -> bool:
    """Whether `repo` loads here: it is in the local hub cache, or the hub answers for it within `timeout_s`."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
    except ImportError:
        return False
    if isinstance(try_to_load_from_cache(repo, "model_index.json"), str) \
            or isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return True
    try:
        HfApi().model_info(repo, timeout=timeout_s)
    except Exception as error:  # offline, DNS, proxy, rate limit: any failure means "not reachable"
        logger.info("the model hub has no answer for %s (%s: %s)", repo, type(error).__name__, error)
        return False
    return True


def bench_model(available: dict[str, bool]) -> str:
    """sd-turbo when it and its tiny VAE load here, else the built-in tiny model."""
    return HUB_MODEL if all(available.get(repo, False) for repo in HUB_REPOS) else FALLBACK_MODEL


def steps(python: str, folder: Path, model: str) -> list[Step]:
    """The check's commands, writing their files into `folder`."""
    doctor, bench, junit = folder / "gpu-check-doctor.json", folder / "gpu-check-bench.json", folder / "gpu-check.xml"
    return [
        Step("doctor", [python, "-m", "engine.doctor", "--json", str(doctor)], doctor),
        Step("cuda_tests", [python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}"], junit),
        Step("tensorrt_benchmark", [python, "-m", "benchmarks.engine", "--backend", "tensorrt", "--size", str(SIZE),
                                    "--model", model, "--device", "cuda", "--dtype", "float16",
                                    "--json", str(bench)], bench),
    ]


def junit_counts(junit_xml: str) -> dict[str, int]:
    """Tests, failures, errors and skips of a pytest JUnit XML report."""
    root = ElementTree.fromstring(junit_xml)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}


def step_result(step: Step, returncode: int, seconds: float) -> dict:
    """What the report says of one finished step: its command, status, duration and the results it wrote."""
    result: dict = {"command": " ".join(step.command), "returncode": returncode, "ok": returncode == 0,
                    "seconds": round(seconds, 1)}
    if step.output is not None and step.output.is_file():
        text = step.output.read_text()
        if step.output.suffix == ".xml":
            result["counts"] = junit_counts(text)
            # pytest exits 5 when no test is selected: no CUDA test ran, so nothing was checked.
            result["ok"] = returncode == 0 and result["counts"]["tests"] > result["counts"]["skipped"]
        else:
            result["results"] = json.loads(text)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every step passed, 1 when one failed, 2 on a machine without CUDA or TensorRT."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check.json"), help="the report's JSON file")
    parser.add_argument("--model", help=f"benchmark model (default: {HUB_MODEL} when the hub has it, else tiny)")
    args = parser.parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"gpu-check needs a CUDA GPU: {reason}. Nothing was run. On this machine, "
              "`python -m engine.doctor` says what works.", file=sys.stderr)
        return 2
    fix = tensorrt_missing_fix()
    if fix is not None:
        print(f"gpu-check needs TensorRT: {fix}. Nothing was run.", file=sys.stderr)
        return 2
    start_logging()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    available = {repo: hub_has(repo) for repo in HUB_REPOS} if args.model is None else {}
    model = args.model or bench_model(available)
    report: dict = {"model": model, "hub": available, "size": SIZE, "steps": {}}
    for step in steps(sys.executable, args.out.parent, model):
        logger.info("gpu-check: %s: %s", step.name, " ".join(step.command))
        started = time.perf_counter()
        try:
            returncode = subprocess.run(step.command, timeout=step.timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            logger.error("gpu-check: %s ran past its bound of %d s and was stopped", step.name, step.timeout_s)
            returncode = -1
        report["steps"][step.name] = step_result(step, returncode, time.perf_counter() - started)
        logger.info("gpu-check: %s %s", step.name, "passed" if report["steps"][step.name]["ok"] else "FAILED")
    report["ok"] = all(result["ok"] for result in report["steps"].values())
    write_json(args.out, report)
    print(f"gpu-check: {'every step passed' if report['ok'] else 'a step FAILED'}; report in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
