"""Persona vector extraction: trait definitions, contrasting answers, diff-mean vectors, layer sweep."""
