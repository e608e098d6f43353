"""`python -m dvgt ...` is the `dvgt` command."""

from dvgt.cli import main

main()
