"""Placeholder: filled in by the video work."""


def register(root) -> None:
    pass
