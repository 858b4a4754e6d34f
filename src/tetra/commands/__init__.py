"""CLI subcommands, one module per group; each exposes register(subparsers).

Entry point: tetra.cli.main assembles them.
"""
