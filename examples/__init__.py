"""Runnable examples. Run them as files (``python examples/digits.py``): from the repository
root, ``python -m examples.digits`` would import the source tree's drep_kernels, which a
regular install leaves without its compiled extension. A package so the tests can import them."""
