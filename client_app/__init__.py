"""Flower ClientApp: train the assigned block on this node's data."""
