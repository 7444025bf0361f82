"""Lay out and launch the pip-bundled Triton server (nvidia-pytriton's ``tritonserver``) on CPU.

The bundled server holds only the python backend. ``prepare_backends`` builds a backends
folder with that backend plus the project's Python-based ``onnxruntime`` stand-in, so that a
standard model repository loads unchanged. Pitfalls handled here (see docs/architecture.md):
``libtriton_python.so`` is copied, not symlinked; the stub is the one for the interpreter
that runs it; the stub finds that interpreter through PATH and needs its LIBDIR on
LD_LIBRARY_PATH; pinned memory is off on a machine without a GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

STANDIN_BACKENDS_DIR = Path(__file__).parent / "triton_backends"


@dataclass(frozen=True)
class TritonRuntime:
    """Where the Triton runtime environment keeps its pieces.

    Attributes:
        python: the interpreter of the Triton environment (``.venv-triton/bin/python``).
        package_dir: the installed ``pytriton/tritonserver`` folder.
        libs_dir: the wheel's bundled shared libraries (``nvidia_pytriton.libs``).
        python_version: ``"3.11"`` style version of that interpreter.
        python_libdir: the interpreter's LIBDIR (libpython lives there).
    """

    python: Path
    package_dir: Path
    libs_dir: Path
    python_version: str
    python_libdir: Path

    @property
    def server_binary(self) -> Path:
        return self.package_dir / "bin" / "tritonserver"


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def discover_runtime(python: Path) -> TritonRuntime:
    """Ask the Triton environment's interpreter where its pieces are.

    Raises:
        FileNotFoundError: when the environment or the bundled server is missing.
    """
    if not python.exists():
        raise FileNotFoundError(
            f"Triton environment interpreter {python} not found: run `make venv-triton` to create it"
        )
    probe = (
        "import json, sys, sysconfig, pathlib, importlib.util;"
        "spec = importlib.util.find_spec('pytriton');"
        "root = pathlib.Path(spec.origin).parent if spec else None;"
        "print(json.dumps({'pkg': str(root / 'tritonserver') if root else '',"
        " 'libs': str(root.parent / 'nvidia_pytriton.libs') if root else '',"
        " 'ver': f'{sys.version_info[0]}.{sys.version_info[1]}',"
        " 'libdir': sysconfig.get_config_var('LIBDIR')}))"
    )
    # Run with -I so the probe cannot pick up the project's own modules.
    output = subprocess.run([str(python), "-I", "-c", probe], check=True, capture_output=True, text=True).stdout
    facts = json.loads(output)
    runtime = TritonRuntime(
        python=python,
        package_dir=Path(facts["pkg"]),
        libs_dir=Path(facts["libs"]),
        python_version=facts["ver"],
        python_libdir=Path(facts["libdir"]),
    )
    if not facts["pkg"] or not runtime.server_binary.exists():
        raise FileNotFoundError(
            f"No tritonserver binary under {runtime.package_dir}: install nvidia-pytriton==0.7.0 "
            "into the Triton environment (`make venv-triton`)"
        )
    return runtime


def prepare_backends(runtime: TritonRuntime, target: Path) -> Path:
    """Build the backends folder Triton is started with and return it.

    Re-running replaces the folder, so an upgraded environment or stand-in takes effect.
    """
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    python_backend = staging / "python"
    python_backend.mkdir(parents=True)
    source = runtime.package_dir / "backends" / "python"
    # A symlinked libtriton_python.so makes Triton look for the stub beside the link target.
    shutil.copy2(source / "libtriton_python.so", python_backend / "libtriton_python.so")
    shutil.copy2(source / "triton_python_backend_utils.py", python_backend / "triton_python_backend_utils.py")
    stub = runtime.package_dir / "python_backend_stubs" / runtime.python_version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"No Triton python stub for Python {runtime.python_version} at {stub}")
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    for backend in STANDIN_BACKENDS_DIR.iterdir():
        if backend.is_dir() and (backend / "model.py").exists():
            (staging / backend.name).mkdir()
            shutil.copy2(backend / "model.py", staging / backend.name / "model.py")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def servable_models(model_repository: Path) -> list[str]:
    """Models in the repository with a config and at least one numeric version folder."""
    if not model_repository.exists():
        return []
    return sorted(
        folder.name
        for folder in model_repository.iterdir()
        if (folder / "config.pbtxt").exists() and any(child.name.isdigit() for child in folder.iterdir())
    )


def server_command(
    runtime: TritonRuntime, model_repository: Path, backends: Path, ports: TritonPorts, host: str = "127.0.0.1"
) -> list[str]:
    """The ``tritonserver`` command line for explicit model control on CPU.

    Models already in the repository are loaded at start-up, so a restarted stack serves what it
    served before.
    """
    return [
        str(runtime.server_binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=true",
        "--metrics-config=summary_latencies=true",
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--exit-on-error=false",
        "--strict-readiness=false",  # one broken model must not mark the whole server unready
        "--log-verbose=0",
        *[f"--load-model={name}" for name in servable_models(model_repository)],
    ]


def server_environment(runtime: TritonRuntime, base: dict[str, str]) -> dict[str, str]:
    """Environment for the server: the stub finds python via PATH and libpython via LD_LIBRARY_PATH."""
    env = dict(base)
    env["PATH"] = f"{runtime.python.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    library_path = [str(runtime.python_libdir), str(runtime.libs_dir)]
    if env.get("LD_LIBRARY_PATH"):
        library_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(library_path)
    return env
