"""A training run: its setup from a config (``setup``, ``build``), the reference pass (``reference``),
the memory search (``memory_search``) and the loop itself (``loop``)."""
