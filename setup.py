"""Build script. The package is pure Python today; compiled ops (csrc/) plug in here."""
from setuptools import setup

setup()
