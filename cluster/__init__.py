"""Herd cluster package."""
