"""Build and load lowbit's C++ CPU kernels (AVX-512 VNNI / BF16) once per machine.

The sources in ``csrc/`` are compiled with the system g++ against torch's headers into a
library cached under ``$LOWBIT_KERNEL_CACHE/<hash>/`` (default ``$LOWBIT_CACHE/kernels``; the
hash covers the sources, flags, torch version and compiler), then loaded with
``torch.ops.load_library``; the ops appear as ``torch.ops.lowbit.*``. When the CPU lacks the
instructions or no compiler is available, ``load()`` returns False and the registry keeps the portable kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
ISA_FLAGS = [
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx512bf16",
    "-mfma",
    "-mavx2",
    "-mf16c",
    "-mbmi2",
]
# at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread.
# The library then shares torch's libgomp (same soname, found through the torch/lib rpath).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
REQUIRED_CPU_FLAGS = (
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "fma",
    "f16c",
    "bmi2",
)


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where unavailable, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported() -> bool:
    return sys.platform.startswith("linux") and all(f in cpu_flags() for f in REQUIRED_CPU_FLAGS)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _command(sources: list[Path], output: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    return [
        _compiler() or "g++",
        *CXX_FLAGS,
        "-shared",
        "-fPIC",
        "-w",
        *ISA_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *map(str, sources),
        "-o",
        str(output),
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        *[f"-L{p}" for p in libs],
        "-lc10",
        "-ltorch_cpu",
        *[f"-Wl,-rpath,{p}" for p in libs],
    ]


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for extra in (*CXX_FLAGS, *ISA_FLAGS, torch.__version__, _compiler() or "", sys.version):
        h.update(extra.encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """Where the built library lives: ``$LOWBIT_KERNEL_CACHE`` (default ``$LOWBIT_CACHE/kernels``)."""
    from ..models import cache_dir

    sources = sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")])
    root = os.environ.get("LOWBIT_KERNEL_CACHE") or cache_dir() / "kernels"
    return Path(root) / _digest(sources) / "lowbit_kernels.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernels (atomically: a half-built library is never left in the cache)."""
    target = library_path()
    if target.exists():
        return target
    if _compiler() is None:
        raise RuntimeError("no C++ compiler (g++) found; install one or set CXX")
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = sorted(CSRC.glob("*.cpp"))
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run(_command(sources, out), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building lowbit kernels failed:\n{result.stderr[-4000:]}")
        os.replace(out, target)
    if verbose:
        print(f"built {target}", file=sys.stderr)
    return target


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Build if needed and load the native kernels; False (with the reason kept) when not possible."""
    global LOAD_ERROR
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        LOAD_ERROR = "disabled by LOWBIT_NATIVE=0"
        return False
    if not cpu_supported():
        LOAD_ERROR = "this CPU lacks AVX-512 VNNI/BF16"
        return False
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as exc:
        LOAD_ERROR = str(exc)
        return False
    return True


LOAD_ERROR: str | None = None


if __name__ == "__main__":  # python -m lowbit.kernels.build: build ahead of time (scripts/setup.sh)
    ok = load()
    print("lowbit native kernels:", "ready" if ok else f"unavailable ({LOAD_ERROR})")
