"""Build shim: all metadata lives in pyproject.toml. Compiled extensions are declared here."""

from setuptools import setup

setup()
