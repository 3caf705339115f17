"""The pipeline's steps, one module each, runnable as ``python -m steps.<name>``."""
