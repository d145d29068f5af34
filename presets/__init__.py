"""Shipped data, installed as `studio.builtin`: presets, model cards, tag lists, starter weights."""
