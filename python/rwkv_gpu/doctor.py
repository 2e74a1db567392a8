"""`python -m rwkv_gpu.doctor`: what this machine offers rwkv-gpu, which adapter a Model
would use and why, and what to do about whatever is in the way. Exit code 0 when a usable
adapter exists, 1 otherwise."""

from __future__ import annotations

import argparse
import ctypes.util
import os
import sys
from typing import Any

from . import __version__, _core
from ._cli import reports_errors
from .errors import DeviceError

# What Model(adapter=None) prefers, best first (src/gpu/context.rs `preference`).
PREFERENCE = "discrete, then integrated, virtual, other, then software (CPU); OpenGL only when asked for by name"
INSTALL_VULKAN = {
    "linux": "install a Vulkan loader and driver: on Debian/Ubuntu `apt-get install libvulkan1 mesa-vulkan-drivers` "
             "(AMD, Intel, and lavapipe on the CPU); for NVIDIA the proprietary driver, which ships its Vulkan driver",
    "win32": "install your GPU vendor's current driver (it ships Vulkan and DX12 support)",
    "darwin": "Metal is part of macOS: update macOS, or check that the machine has a GPU",
}


def _mib(n: Any) -> str:
    return f"{int(n) / 2**20:.0f} MiB"


def describe(a: dict[str, Any]) -> str:
    features = ", ".join(f"{name} {'yes' if a[key] else 'no'}" for name, key in (("shader-f16", "shader_f16"), ("subgroups", "subgroups")))
    return (f"{a['index']}: {a['name']} ({a['backend']}, {a['device_type']}); driver {a['driver'] or '?'} {a['driver_info'] or ''}".rstrip()
            + f"\n     {features}; largest storage binding {_mib(a['max_storage_binding'])}, largest buffer {_mib(a['max_buffer_size'])}")


def diagnose(adapters: list[dict[str, Any]], env_choice: str | None) -> tuple[list[str], int | None, list[str]]:
    """(lines to print, the index a Model would use or None, problems with their fixes)."""
    lines, problems = [], []
    platform = "linux" if sys.platform.startswith("linux") else sys.platform
    if platform == "linux":
        loader = ctypes.util.find_library("vulkan")
        lines.append(f"Vulkan loader: {loader or 'not found'}")
        if not loader:
            problems.append(f"no Vulkan loader (libvulkan.so.1): {INSTALL_VULKAN['linux']}")
    lines.append(f"adapters ({len(adapters)}):")
    lines += [f"  {describe(a)}" for a in adapters] or ["  none"]
    try:
        chosen, warnings = _core.choose_adapter(None)
    except DeviceError as e:
        chosen, warnings = None, []
        first = str(e).split(";")[0]
        if env_choice:
            problems.append(f"RWKV_GPU_ADAPTER={env_choice!r}: {first}; fix: unset it, or set it to an index or a name "
                            "substring of the adapters above")
        elif not [a for a in adapters if a["backend"] != "gl"]:
            problems.append(f"no Vulkan, Metal or DX12 adapter: {INSTALL_VULKAN.get(platform, INSTALL_VULKAN['linux'])}")
        else:
            problems.append(first)
    if chosen is not None:
        a = adapters[chosen]
        why = f"RWKV_GPU_ADAPTER={env_choice!r}" if env_choice else f"kind ({PREFERENCE})"
        lines.append(f"a Model would use: {a['index']}: {a['name']} ({a['backend']}, {a['device_type']}), chosen by {why}")
        if a["device_type"] == "cpu":
            problems.append(f"only a software adapter ({a['name']}): everything runs on the CPU, slowly; "
                            f"{INSTALL_VULKAN.get(platform, INSTALL_VULKAN['linux'])}")
        missing = [name for name, key in (("shader-f16", "shader_f16"), ("subgroups", "subgroups")) if not a[key]]
        if missing:
            problems.append(f"the driver of {a['name']} lacks {', '.join(missing)}: the portable (slower) kernels run; "
                            "a newer driver may add them")
        problems += [w for w in warnings if "software adapter" not in w]
    return lines, chosen, problems


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.doctor", description=__doc__)
    ap.parse_args(argv)
    env_choice = os.environ.get("RWKV_GPU_ADAPTER", "").strip() or None
    lines, chosen, problems = diagnose(_core_adapters(), env_choice)
    print(f"rwkv-gpu {__version__}, Python {sys.version.split()[0]}, {sys.platform}")
    print("\n".join(lines))
    if problems:
        print("problems:")
        for p in problems:
            print(f"  - {p}")
    else:
        print("no problems found")
    return 0 if chosen is not None else 1


def _core_adapters() -> list[dict[str, Any]]:
    return list(_core.adapters())


if __name__ == "__main__":
    sys.exit(main())
