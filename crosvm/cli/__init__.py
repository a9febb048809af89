"""Command line: crosvm's argument grammar, --cfg files and subcommands."""
