"""Measurements: scripts, and the glass-to-glass probe. Importable from a checkout
(the repository root on sys.path, as when running run_stream.py); not installed with the package."""
