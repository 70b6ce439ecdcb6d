"""Tokenizers, dataset preparation and the batch loader; no model code."""
