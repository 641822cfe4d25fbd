"""``python -m potluck.cli``: the same as the ``potluck`` console script."""

from potluck.cli.app import main

main()
