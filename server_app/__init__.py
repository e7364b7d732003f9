"""Flower ServerApp for fedcybgd."""
