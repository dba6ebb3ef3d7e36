"""The ``asft`` command: ``startup`` prepares JAX for the host, ``parser`` reads the command line and
``commands`` runs it."""
