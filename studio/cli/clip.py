"""Placeholder: filled in by the clip work."""


def register(root) -> None:
    pass
