"""Build the native core with CMake (the pybind11 cmake_example pattern).

``flatfast._C`` (C++17 + OpenMP) always builds. ``flatfast._C_cuda`` builds only when ``FLATFAST_CUDA=1``
and nvcc is found; importing flatfast never depends on it. ``FLATFAST_NATIVE=1`` adds ``-march=native``
(fast here, unsafe to ship to another CPU).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
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
            f"-DFLATFAST_CUDA={'ON' if os.environ.get('FLATFAST_CUDA') == '1' else 'OFF'}",
            f"-DFLATFAST_NATIVE={'ON' if os.environ.get('FLATFAST_NATIVE') == '1' else 'OFF'}",
        ]
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", config, "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("flatfast._C")], cmdclass={"build_ext": CMakeBuild})
