"""Reference image-generation server: a real Pillow-backed stand-in for a flaky external API."""
from generator.app import create_app

__all__ = ["create_app"]
