"""Build the native core with CMake (the pybind11 cmake_example pattern).

Environment variables read at install time:

* ``FLATFAST_NO_NATIVE=1``: install the pure-Python package; every function runs on the numpy/torch reference.
* ``FLATFAST_OPENMP=AUTO|ON|OFF`` (default AUTO): thread the C++ kernels with OpenMP when the compiler has it,
  else with std::thread workers (ON makes OpenMP required, OFF never uses it).
* ``FLATFAST_CUDA=1``: also build ``flatfast._C_cuda`` (needs nvcc); importing flatfast never depends on it.
* ``FLATFAST_NATIVE=1``: add ``-march=native`` (fast here, unsafe to ship to another CPU).

A native build that fails stops the install with a message saying what failed and how to install without it,
rather than quietly installing a package whose every benchmark would then measure the slow reference.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
OPENMP_CHOICES = {"": "AUTO", "AUTO": "AUTO", "ON": "ON", "1": "ON", "OFF": "OFF", "0": "OFF"}


class NativeBuildError(RuntimeError):
    pass


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _flag(name):
    return "ON" if os.environ.get(name) == "1" else "OFF"


class CMakeBuild(build_ext):
    def build_extensions(self):
        # One CMake run builds every module into the directory of the first; setuptools then copies each
        # registered module (an editable install copies only registered ones, so _C_cuda is registered too).
        self.build_with_cmake(self.extensions[0])

    def build_with_cmake(self, ext):
        openmp = os.environ.get("FLATFAST_OPENMP", "").upper()
        if openmp not in OPENMP_CHOICES:
            raise NativeBuildError(f"FLATFAST_OPENMP must be AUTO, ON or OFF (or 1/0), got {openmp!r}")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if os.environ.get("FLATFAST_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DFLATFAST_OPENMP={OPENMP_CHOICES[openmp]}",
            f"-DFLATFAST_CUDA={_flag('FLATFAST_CUDA')}",
            f"-DFLATFAST_NATIVE={_flag('FLATFAST_NATIVE')}",
        ]
        jobs = str(os.cpu_count() or 2)
        steps = [("configure (cmake)", ["cmake", str(ROOT), *args]),
                 ("compile", ["cmake", "--build", ".", "--config", config, "-j", jobs])]
        for step, command in steps:
            try:
                subprocess.run(command, cwd=build_temp, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise NativeBuildError(
                    f"\n\nflatfast: the native core failed to build at the {step} step ({exc}).\n"
                    "It needs a C++17 compiler (OpenMP optional). flatfast works without it, on the slower "
                    "numpy/torch reference paths:\n"
                    "    FLATFAST_NO_NATIVE=1 pip install ...   (the same command you ran)\n"
                    "`flatfast info` then says that the C++ backend is not built.\n") from exc


native = os.environ.get("FLATFAST_NO_NATIVE") != "1"
modules = ["flatfast._C"] + (["flatfast._C_cuda"] if _flag("FLATFAST_CUDA") == "ON" else [])
setup(ext_modules=[CMakeExtension(name) for name in modules] if native else [],
      cmdclass={"build_ext": CMakeBuild} if native else {})
