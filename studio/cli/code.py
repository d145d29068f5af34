"""Placeholder: filled in by the code work."""


def register(root) -> None:
    pass
