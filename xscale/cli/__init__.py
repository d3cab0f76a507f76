"""The ``xscale`` command. Each sub-command lives in its own module here."""
