"""Subcommands of the `guardstream` CLI, one module each with `register(subparsers)`."""
