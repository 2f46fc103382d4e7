"""Build of the C++ CPU ops (csrc/) as the extension `prmkd_dist._C`.

Everything else lives in pyproject.toml. The extension needs torch at build time, so the project is
installed with `pip install --no-build-isolation` after torch (`make install` does this). A compiler
error fails the install loudly: there is no silent fallback build.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="prmkd_dist._C",
            sources=sources,
            # -fno-trapping-math: the ops never read floating-point exception flags; without it GCC keeps the
            # clamps of fast_exp (csrc/kd_vec.cpp) as branches and leaves the exp loops scalar (8x slower, AVX2)
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

# `kernels/` is mapped to `prmkd_dist.kernels` (pyproject's package-dir); find_packages cannot see it there
packages = find_packages(include=["prmkd_dist", "prmkd_dist.*"]) + ["prmkd_dist.kernels"]

setup(packages=packages, package_data={"prmkd_dist.configs": ["*.yaml"], "prmkd_dist.configs.data": ["*.yaml"],
                                         "prmkd_dist.configs.teachers": ["*.yaml"]}, ext_modules=ext_modules, cmdclass=cmdclass)
