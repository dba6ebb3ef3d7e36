"""The TensorBoard half of the metrics log: readable events, written without importing torch."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

PROBE = """
import sys
from asft_jax.io.metrics_log import _summary_writer

writer = _summary_writer()(sys.argv[1])
for step, loss in ((1, 0.75), (2, 0.5)):
    writer.add_scalar("loss", loss, step)
writer.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch  # still importable afterwards, for whoever needs it
"""


@pytest.mark.spawn
def test_events_are_written_without_torch_and_read_back(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert scalars(tmp_path, "loss") == [(1, 0.75), (2, 0.5)]


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in the folder's event files: TFRecords ([u64 length][u32 crc][Event
    proto][u32 crc]) read here, not by the writer's code."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out
