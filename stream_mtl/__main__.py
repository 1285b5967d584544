"""``python -m stream_mtl`` runs the CLI."""

from stream_mtl.cli import main

if __name__ == "__main__":  # not when a spawned child (the report process) imports this module as __mp_main__
    main()
