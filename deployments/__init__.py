"""Herd deployments package."""
