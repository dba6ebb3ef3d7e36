"""Starting JAX for a command without the accelerator plugins' probing noise.

Installed with the ``tpu`` and ``gpu-aot`` extras (``make test`` installs both), libtpu and the CUDA
plugin probe for hardware whenever JAX starts: on a host without it they print host-bounds warnings,
a hostname error with a source-location trace, "Could not find cuda drivers" lines and a plugin
traceback on every command. On such a host the command runs on the CPU backend (``JAX_PLATFORMS=cpu``
unless the user set it), and the C++ log lines of importing JAX and loading its plugins are kept off
the terminal. The plugins stay registered: ``asft compile`` still compiles for TPU and GPU topologies.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # a GPU, in a container, under WSL2
AMD_DEVICE_FILE = "/dev/kfd"


def has_accelerator() -> bool:
    """Whether this host has a TPU, NVIDIA or AMD GPU that JAX could use (device files only)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == GOOGLE_PCI_VENDOR:
                return True
    return any(os.path.exists(p) for p in (*NVIDIA_DEVICE_FILES, AMD_DEVICE_FILE))


def start_jax() -> None:
    """On a host without accelerators: imports JAX for the CPU backend and registers its plugins (no
    backend is created, so ``jax.distributed`` can still start), dropping the native log lines of
    doing so; anything else written to stderr meanwhile is passed on."""
    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS") or has_accelerator():
        return  # started already, the user chose the platform, or the probes have hardware to find
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.stderr.flush()
    terminal = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import jax  # noqa: F401
            from jax._src import xla_bridge

            register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
            if register is not None:  # loading the plugins logs too; a backend would be created later anyway
                register()
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True) if not _noise(line)]
            sys.stderr.write("".join(kept))


def _noise(line: str) -> bool:
    """A line absl/tsl logs while the plugins look for hardware the host does not have."""
    return (
        "absl::InitializeLog()" in line
        or "cudart_stub.cc" in line
        or "Logging before InitGoogle()" in line
        or "Could not find cuda drivers" in line
    )
