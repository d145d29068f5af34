"""Placeholder: filled in by the music work."""


def register(root) -> None:
    pass
