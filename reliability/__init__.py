"""Reliability probes: `python -m reliability [--short]` runs fault probes against real server
processes and real training runs and writes the figures into RELIABILITY.md (never typed by hand)."""
