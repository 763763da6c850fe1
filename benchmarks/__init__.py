"""Benchmarks: one script per question, each writing a report under benchmarks/reports/."""
