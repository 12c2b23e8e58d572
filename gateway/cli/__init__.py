"""The process layer: the ``rdv`` command, ``serve`` and its supervisor, the admin CLI."""
