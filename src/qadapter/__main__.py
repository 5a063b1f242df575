"""`python -m qadapter` (and `accelerate launch -m qadapter`) run the CLI."""

from qadapter.cli import main

main()
