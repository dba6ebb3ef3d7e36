"""Starting JAX for a command without the accelerator plugins' probing noise.

Installed with the ``tpu`` and ``gpu-aot`` extras (``make test`` installs both), libtpu and the CUDA
plugin probe for hardware whenever JAX starts: on a host without it they print host-bounds warnings,
a hostname error with a source-location trace, "Could not find cuda drivers" lines and a plugin
traceback on every command. On such a host the command runs on the CPU backend (``JAX_PLATFORMS=cpu``
unless the user set it), and the C++ log lines of importing JAX and loading its plugins are kept off
the terminal (``asft_jax.quiet``). The plugins stay registered: ``asft compile`` still compiles for
TPU and GPU topologies.
"""

from __future__ import annotations

import glob
import os
import sys

from asft_jax.quiet import native_stderr_filtered

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id (so is a GCE VM's gVNIC)
TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # v3 ... TPU7x
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # a GPU, in a container, under WSL2
AMD_DEVICE_FILE = "/dev/kfd"


def has_accelerator() -> bool:
    """Whether this host has a TPU, NVIDIA or AMD GPU that JAX could use (device files only)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
            if f.read().strip() == GOOGLE_PCI_VENDOR and g.read().strip() in TPU_PCI_DEVICES:
                return True
    return any(os.path.exists(p) for p in (*NVIDIA_DEVICE_FILES, AMD_DEVICE_FILE))


def start_jax() -> None:
    """On a host without accelerators: imports JAX for the CPU backend and registers its plugins (no
    backend is created, so ``jax.distributed`` can still start), dropping the native log lines of
    doing so; anything else written to stderr meanwhile is passed on."""
    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS") or has_accelerator():
        return  # started already, the user chose the platform, or the probes have hardware to find
    os.environ["JAX_PLATFORMS"] = "cpu"
    with native_stderr_filtered():
        import jax  # noqa: F401
        from jax._src import xla_bridge

        register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
        if register is not None:  # loading the plugins logs too; a backend would be created later anyway
            register()
