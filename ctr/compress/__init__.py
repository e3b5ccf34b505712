"""Compression recipes: stages that each read a checkpoint and write a smaller one, with a report."""
