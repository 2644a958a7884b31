"""Turns runs into comparisons: planning, reproduction, tidy results, reports, benchmarks."""
