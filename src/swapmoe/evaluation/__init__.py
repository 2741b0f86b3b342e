"""Accuracy measurements of a (swapmoe-loaded) model: perplexity of a continuous text stream."""

from swapmoe.evaluation.perplexity import PerplexityResult, stream_perplexity, tokenize_text, windows

__all__ = ["PerplexityResult", "stream_perplexity", "tokenize_text", "windows"]
