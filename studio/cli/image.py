"""Placeholder: filled in by the image work."""


def register(root) -> None:
    pass
