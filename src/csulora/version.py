"""csulora's version, in a leaf module so any layer can record it (reports, cards, caches)."""

__version__ = "0.1.0"
