"""``python -m stream_mtl`` runs the CLI."""

from stream_mtl.cli import main

main()
