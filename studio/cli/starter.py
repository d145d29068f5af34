"""Placeholder: filled in by the starter work."""


def register(root) -> None:
    pass
