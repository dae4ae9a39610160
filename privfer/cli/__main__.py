"""``python -m privfer.cli``: the same as the ``privfer`` command."""

from privfer.cli import main

main()
