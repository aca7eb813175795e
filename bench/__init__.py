"""The overhead benchmark (``bench/run.py``); not part of the test suite."""
