"""Serving: the Triton model repository writer, the local Triton launcher and client helpers."""
