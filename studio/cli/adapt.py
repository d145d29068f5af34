"""Placeholder: filled in by the adapt work."""


def register(root) -> None:
    pass
