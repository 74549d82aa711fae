"""ESA: Extreme Sensitivity Analysis of causal language models."""

__version__ = "0.1.0"
