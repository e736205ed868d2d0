"""rayllm: a language model from raw text to an HTTP endpoint on Ray."""

__version__ = "0.1.0"
