"""Subcommands that live in their own modules; builder.cli loads each one only when it runs.

Each module defines `command`, a click.Command. Use `click.pass_obj` to receive the
`builder.cli.Context` (matrix path, project, `load()` for config/knowledge/resolution).
"""
