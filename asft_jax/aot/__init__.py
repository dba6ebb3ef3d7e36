"""Ahead-of-time compiling for accelerators this host does not have: the chip and topology table
(``accelerators``) and the compile report (``compiler``)."""
