"""The parts of ``python -m examples.reproduce``: data, the sweep, its runners, F2, the analysis and the report."""
