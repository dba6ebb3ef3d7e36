"""Native log lines of XLA's plugins kept off the terminal.

libtpu and the CUDA plugin log through absl/tsl straight to file descriptor 2 while they look for
hardware: on a host without it (any host ``asft compile`` describes a TPU slice from) that is
host-bounds and worker-hostname warnings, a source-location trace and "Could not find cuda drivers"
lines, none of which a user can act on. ``native_stderr_filtered`` captures the descriptor for a
block and passes on every other line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

PROBING_NOISE = (
    "absl::InitializeLog()",  # "All log messages before absl::InitializeLog() is called are written to STDERR"
    "Logging before InitGoogle()",
    "cudart_stub.cc",
    "Could not find cuda drivers",
    "Failed to find host bounds for accelerator type",
    "unexpected worker hostname",
    "=== Source Location Trace: ===",
    "libtpu_init_utils.cc",
)


@contextlib.contextmanager
def native_stderr_filtered(noise: tuple[str, ...] = PROBING_NOISE) -> Iterator[None]:
    """Runs the block with file descriptor 2 captured, then writes what it received to stderr
    without the lines that contain one of ``noise``."""
    sys.stderr.flush()
    terminal = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(True)
            sys.stderr.write("".join(line for line in lines if not any(n in line for n in noise)))
