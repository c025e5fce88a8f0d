"""Seeing attention: the explainer, plots and views."""
