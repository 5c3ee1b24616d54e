"""`python -m mergekit_lite.cli`: the same as the `merge` command."""

from .commands import main

main()
