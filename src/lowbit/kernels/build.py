"""Build and load lowbit's C++ CPU kernels once per machine: AVX-512 VNNI / BF16 (``csrc/``, ops
``torch.ops.lowbit.*``) and, for x86 CPUs without AVX-512, AVX2 + FMA (``csrc_avx2/``, ops
``torch.ops.lowbit_avx2.*``).

The sources of a flavour are compiled with the system g++ against torch's headers into a
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
CSRC_AVX2 = Path(__file__).parent / "csrc_avx2"
AVX2_ISA_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
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


def cpu_supported(required: tuple[str, ...] = REQUIRED_CPU_FLAGS) -> bool:
    return sys.platform.startswith("linux") and all(f in cpu_flags() for f in required)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _command(sources: list[Path], output: Path, isa: list[str] = ISA_FLAGS) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    return [
        _compiler() or "g++",
        *CXX_FLAGS,
        "-shared",
        "-fPIC",
        "-w",
        *isa,
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


def _digest(sources: list[Path], isa: list[str] = ISA_FLAGS) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for extra in (*CXX_FLAGS, *isa, torch.__version__, _compiler() or "", sys.version):
        h.update(extra.encode())
    return h.hexdigest()[:16]


def library_path(csrc: Path = CSRC, isa: list[str] = ISA_FLAGS) -> Path:
    """Where the built library lives: ``$LOWBIT_KERNEL_CACHE`` (default ``$LOWBIT_CACHE/kernels``)."""
    from ..models import cache_dir

    sources = sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")])
    root = os.environ.get("LOWBIT_KERNEL_CACHE") or cache_dir() / "kernels"
    return Path(root) / _digest(sources, isa) / f"lowbit_{csrc.name}.so"


def build(verbose: bool = False, csrc: Path = CSRC, isa: list[str] = ISA_FLAGS) -> Path:
    """Compile the kernels (atomically: a half-built library is never left in the cache)."""
    target = library_path(csrc, isa)
    if target.exists():
        return target
    if _compiler() is None:
        raise RuntimeError("no C++ compiler (g++) found; install one or set CXX")
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = sorted(csrc.glob("*.cpp"))
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run(_command(sources, out, isa), capture_output=True, text=True)
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


@functools.lru_cache(maxsize=1)
def load_avx2() -> bool:
    """Build if needed and load the AVX2 + FMA kernels (``torch.ops.lowbit_avx2``); False (reason in
    ``AVX2_LOAD_ERROR``) when disabled (``LOWBIT_NATIVE=0``), unsupported or not buildable."""
    global AVX2_LOAD_ERROR
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        AVX2_LOAD_ERROR = "disabled by LOWBIT_NATIVE=0"
        return False
    if not cpu_supported(AVX2_CPU_FLAGS):
        AVX2_LOAD_ERROR = "this CPU lacks AVX2/FMA/F16C"
        return False
    try:
        torch.ops.load_library(str(build(csrc=CSRC_AVX2, isa=AVX2_ISA_FLAGS)))
    except (RuntimeError, OSError) as exc:
        AVX2_LOAD_ERROR = str(exc)
        return False
    return True


AVX2_LOAD_ERROR: str | None = None


if __name__ == "__main__":  # python -m lowbit.kernels.build: build ahead of time (scripts/setup.sh)
    ok = load()
    print("lowbit native kernels:", "ready" if ok else f"unavailable ({LOAD_ERROR})")
    ok = load_avx2()
    print("lowbit AVX2 kernels:", "ready" if ok else f"unavailable ({AVX2_LOAD_ERROR})")
