"""The ``pricelevel`` command groups; :mod:`flows.cli` is the entry point that assembles them."""
