"""The image generator as renderq sees it: an HTTP client and the one classification of its failures."""
