"""Build of the native CPU kernels: csrc/*.cpp -> the extension module `model._native`.

Everything else about the package is in pyproject.toml. deploy/install.sh installs torch first and
then this project with --no-build-isolation, so the build compiles against the torch it will run
with (a build-isolated pip would fetch another torch just to build).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
# -ffp-contract=off: only the fused multiply-adds written out are fused, so the AVX2 and scalar paths
# compute the same bits; OpenMP is torch's own (the same libgomp), so the kernels share its thread pool.
native = CppExtension("model._native", sources, extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
                      extra_link_args=["-fopenmp"])
setup(ext_modules=[native], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
