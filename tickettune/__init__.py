"""tickettune: adapt a base LLM to one support desk from a handful of labelled tickets."""

__version__ = "0.1.0"
