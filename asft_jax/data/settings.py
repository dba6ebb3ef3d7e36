"""The ``data`` section of a run's config: what to read, how to fit pairs into ``max_length``, and how to
lay them out. The train loop and the pipeline share it (one type, one set of defaults)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # file or Hub dataset id[:split], optionally with a `#part=...` selection (data.records)
    fallback: str | None = None  # read instead of a missing `path` / `eval_path`, only with path_optional
    path_optional: bool = False  # true: a missing local `path` switches to `fallback` (announced); false: an error
    split: str = "train"
    format: str | None = None  # None: detected from the records (asft_jax.data.formats)
    eval_path: str | None = None
    eval_format: str | None = None  # the eval file's own format (not `format`); None: detected from its records
    eval_split: str = "test"
    eval_pairs: int = 64  # pairs of the eval split scored at each evaluation
    max_length: int = 512
    max_prompt_length: int | None = None  # None: max_length // 2
    truncation: str = "head_and_tail"  # head_and_tail | keep_end | drop (asft_jax.data.tokenize)
    strict: bool = False  # stop at the first malformed record (file:line: reason) instead of skipping and counting
    # it; pairs that only do not fit the lengths (data.records.DoesNotFit) are counted either way
    num_epochs: int | None = None  # None: repeat until max_steps
    shuffle: bool = True
    num_threads: int = 2
    layout: str = "packed_shared_prefix"  # padded | packed | packed_shared_prefix (asft_jax.data.packing)
    fixed_shape: bool = True  # one step shape per run, pairs that do not fit carried over (asft_jax.data.steps);
    # false: every step has all batch_size pairs and its own shape (a compile per new shape)

    def eval_split_config(self) -> DataConfig:
        """The eval split as a one-pass, file-order source (``path`` = ``eval_path``)."""
        return dataclasses.replace(
            self, path=self.eval_path, split=self.eval_split, format=self.eval_format, shuffle=False, num_epochs=1
        )
