from setuptools import setup; setup(cffi_modules=["native/build.py:ffibuilder"])  # noqa: E702, I001
