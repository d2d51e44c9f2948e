"""``python -m massmerge ...``: the same command line as the ``massmerge`` script."""

from massmerge.cli import main

main()
