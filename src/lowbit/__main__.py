"""`python -m lowbit` runs the CLI."""

from .cli import main

main()
