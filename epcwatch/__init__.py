"""The `epcwatch` command: one entry point with a subcommand per task."""
