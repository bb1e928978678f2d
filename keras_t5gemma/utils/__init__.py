"""Plumbing shared by every model family: presets, and KerasHub's private names."""
