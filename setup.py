"""Packaging: `pip install .` (or `python setup.py build_native`) also builds native/ into engine/_lib/."""
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildNative(Command):
    """Run native/Makefile: the CPU library always, the CUDA library when nvcc is found."""

    description = "build libpa_cpu.so (and libpa_cuda.so with nvcc) into engine/_lib"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        prefix = Path(sys.prefix)
        targets = ["cpu"] + (["cuda"] if shutil.which("nvcc") else [])
        subprocess.check_call(["make", "-C", str(ROOT / "native"), f"PYTHON_PREFIX={prefix}", *targets])


class BuildPy(build_py):
    def run(self):
        self.run_command("build_native")
        super().run()


setup(
    name="pagedecode",
    version="0.1.0",
    description="A paged-KV-cache LLM inference engine: INT8 CPU and CUDA backends, web app, beam search",
    packages=find_packages(include=["engine", "engine.*", "webapp", "webapp.*"]),
    package_data={"engine": ["_lib/*.so"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[line for line in (ROOT / "requirements.txt").read_text().splitlines()
                      if line and not line.startswith("#")],
    entry_points={"console_scripts": ["pagedecode=engine.cli:main"]},
    cmdclass={"build_native": BuildNative, "build_py": BuildPy},
)
