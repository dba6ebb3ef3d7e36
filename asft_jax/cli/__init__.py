"""The ``asft`` command: ``startup`` prepares JAX for the host, ``commands`` parses and runs."""
