"""Benchmarks behind ``make bench``: speed and memory targets measured as ratios in one run.

Each module exposes ``run(out_lines: list[str])`` that appends Markdown to the report.
"""
