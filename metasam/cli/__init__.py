"""The ``metasam`` command line (the top layer: it imports the rest, nothing imports it)."""
