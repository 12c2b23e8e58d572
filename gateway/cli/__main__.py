"""``python -m gateway.cli``: the ``rdv`` command, as before the CLI became a package."""

from gateway.cli.main import main

main()
