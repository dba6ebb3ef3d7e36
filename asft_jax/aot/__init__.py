"""Ahead-of-time compiling for accelerators this host does not have: the chip and topology table
(``accelerators``), the step's inputs as shapes (``step_inputs``), the compiled program's HLO text
(``hlo``), its FLOPs and bytes (``cost``), the roofline estimate (``roofline``), the memory budget and
advice (``fit``), and ``asft compile`` itself (``compiler``)."""
