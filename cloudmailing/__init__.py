"""CloudMailing: a bulk e-mailing engine."""

__version__ = "0.1.0"
