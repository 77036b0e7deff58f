"""Build shim: all metadata lives in pyproject.toml; the compiled kernels are declared here.

Two optional extensions, both pybind11 modules on raw buffers (no torch headers, so one build
works with any installed torch):

* ``safeflow.kernels._cpu`` from ``csrc/cpu`` — built wherever a C++17 compiler exists;
* ``safeflow.kernels._cuda`` from ``csrc/cuda`` — built only where ``nvcc`` is found
  (``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``), for the
  architectures in ``SAFEFLOW_CUDA_ARCH`` (default ``80;90``, plus PTX of the last).

A failed or impossible build is reported and skipped: safeflow then installs and runs on its
eager ``"torch"`` kernel backend. ``SAFEFLOW_NO_EXT=1`` skips both; ``SAFEFLOW_REQUIRE_EXT=1``
turns a failed build into an error (CI uses it); ``SAFEFLOW_PORTABLE=1`` drops ``-march=native``;
``SAFEFLOW_SANITIZE=1`` compiles and links the CPU module (only) with AddressSanitizer
(``-fsanitize=address -fno-omit-frame-pointer``, ``-O1 -g``) for a fuzz run; import it with the
compiler's libasan preloaded (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``,
``ASAN_OPTIONS=detect_leaks=0``) and rebuild without the flag afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CPU_SOURCES = ["csrc/cpu/polytope_cpu.cpp", "csrc/cpu/projection.cpp", "csrc/cpu/bindings.cpp"]
CUDA_SOURCES = ["csrc/cuda/polytope_cuda.cu"]
CUDA_BINDINGS = ["csrc/cuda/bindings.cpp"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _warn(message: str) -> None:
    print(f"safeflow: {message}", file=sys.stderr)


def cuda_home() -> Path | None:
    """The CUDA toolkit root holding bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return Path(c)
    return None


def pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


class BuildExt(build_ext):
    """Builds each extension if it can; a failure warns (or raises with SAFEFLOW_REQUIRE_EXT=1)."""

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                ext.include_dirs.append(pybind11_include())
                if ext.name.endswith("_cuda"):
                    self._compile_cuda(ext)
                self._build_with_fallback(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure falls back to the eager backend
                if _flag("SAFEFLOW_REQUIRE_EXT"):
                    raise
                _warn(f"could not build {ext.name} ({exc}); safeflow will use its eager 'torch' kernel backend")
                self.extensions.remove(ext)  # nothing to copy or package for it

    def _build_with_fallback(self, ext: Extension) -> None:
        try:
            self.build_extension(ext)
        except Exception:
            if "-march=native" not in ext.extra_compile_args:
                raise
            _warn(f"{ext.name}: retrying without -march=native")
            ext.extra_compile_args.remove("-march=native")
            self.build_extension(ext)

    def _compile_cuda(self, ext: Extension) -> None:
        home = cuda_home()
        assert home is not None
        archs = [a.strip() for a in os.environ.get("SAFEFLOW_CUDA_ARCH", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        build = Path(self.build_temp) / "cuda"
        build.mkdir(parents=True, exist_ok=True)
        for src in CUDA_SOURCES:
            obj = build / (Path(src).stem + ".o")
            cmd = [str(home / "bin" / "nvcc"), "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *gencode]
            _warn(" ".join(cmd))
            subprocess.run(cmd, check=True)
            ext.extra_objects.append(str(obj))
        lib = next((home / d for d in ("lib64", "lib", "targets/x86_64-linux/lib") if (home / d).exists()), home)
        ext.library_dirs.append(str(lib))


def extensions() -> list[Extension]:
    if _flag("SAFEFLOW_NO_EXT"):
        return []
    cflags = ["-O3", "-std=c++17"] + ([] if _flag("SAFEFLOW_PORTABLE") else ["-march=native"])
    ldflags: list[str] = []
    if _flag("SAFEFLOW_SANITIZE"):
        asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
        cflags, ldflags = [*cflags, *asan, "-O1", "-g"], asan
    exts = [Extension("safeflow.kernels._cpu", CPU_SOURCES, extra_compile_args=list(cflags),
                      extra_link_args=ldflags, language="c++")]
    if _flag("SAFEFLOW_SANITIZE"):
        return exts  # a sanitizer build is for fuzzing the CPU kernel; the CUDA module is left as it is
    if cuda_home() is not None:
        exts.append(Extension("safeflow.kernels._cuda", CUDA_BINDINGS, extra_compile_args=["-O2", "-std=c++17"],
                              libraries=["cudart_static", "rt", "pthread", "dl"], language="c++"))
    else:
        _warn("nvcc not found (set CUDA_HOME to build the CUDA kernels); building the CPU kernels only")
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
