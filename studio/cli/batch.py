"""Placeholder: filled in by the batch work."""


def register(root) -> None:
    pass
