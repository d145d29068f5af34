"""Placeholder: filled in by the caption work."""


def register(root) -> None:
    pass
