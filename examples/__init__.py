"""Runnable examples (``python -m examples.digits``)."""
