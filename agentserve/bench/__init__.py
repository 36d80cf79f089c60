"""Benchmarks of served systems: one client, one definition of each metric, subcommands."""
