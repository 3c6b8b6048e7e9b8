"""rise-ray: RISE (Recursive Introspection) on Ray."""

__version__ = "0.1.0"
