"""The HTTP server: ``python -m mloffload.server``."""
