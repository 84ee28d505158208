"""Loaders, one per kind of site data."""
