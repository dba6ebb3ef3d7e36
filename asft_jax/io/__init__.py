"""Model I/O: where a model comes from and where it goes.

Layering (each module imports only those above it):
``source`` (the ``ModelSource`` protocol) and ``safetensors``, ``demo`` -> ``hf`` (HF folders and
the HF tensor naming) -> ``gguf`` (+ ``gguf_tokenizer``) -> ``run`` (training runs) -> ``resolve``
-> ``export``.
"""

from asft_jax.io.demo import DEMO
from asft_jax.io.resolve import load_model, resolve
from asft_jax.io.source import ModelSource

__all__ = ["DEMO", "ModelSource", "load_model", "resolve"]
