"""The PEP 517 build backend of rwkv-gpu: maturin's, except that on Linux a wheel is
linked with zig (the `ziglang` package, a build requirement) against glibc 2.28, so
that `pip wheel .` and `pip install .` make a manylinux_2_28 wheel that PyPI takes and
older distributions run, with no container. Explicit maturin arguments
(`MATURIN_PEP517_ARGS`, `-C maturin.build-args=...`) are left as given."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import maturin
from maturin import (  # noqa: F401  (the other hooks, unchanged)
    build_editable,
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

PORTABLE = "--zig --compatibility manylinux_2_28"


def _settings(config_settings: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    given = config_settings or {}
    if "maturin.build-args" in given or "build-args" in given or os.environ.get("MATURIN_PEP517_ARGS"):
        return config_settings
    if not sys.platform.startswith("linux") or importlib.util.find_spec("ziglang") is None:
        return config_settings
    # maturin runs zig as `python3 -m ziglang`: let that be this interpreter, which has it.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**given, "maturin.build-args": PORTABLE}


def build_wheel(wheel_directory: str, config_settings: Mapping[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    return maturin.build_wheel(wheel_directory, _settings(config_settings), metadata_directory)
