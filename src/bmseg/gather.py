"""Placeholder: the helper that owns this step replaces this file."""


def register(subparsers):
    """Adds nothing yet."""
