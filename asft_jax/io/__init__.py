"""Model I/O: where a model comes from and where it goes.

Within the io layer (the package's layers: docs/architecture.md, checked by tests/test_layers.py),
each module imports only those before it: ``source`` (the ``ModelSource`` protocol), ``safetensors``,
``demo``, ``gguf_container`` (the GGUF file format) -> ``hf`` (HF folders and the HF tensor naming)
-> ``gguf`` (+ ``gguf_tokenizer``) -> ``checkpoint`` -> ``metrics_log`` -> ``run`` (training runs)
-> ``resolve`` -> ``export`` and ``gguf_export``.
"""

from asft_jax.io.demo import DEMO
from asft_jax.io.resolve import load_model, resolve
from asft_jax.io.source import ModelSource

__all__ = ["DEMO", "ModelSource", "load_model", "resolve"]
