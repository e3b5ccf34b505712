"""Generic helpers every other package uses: atomic writes, JSON lines, strict YAML configs, the
project's error classes. The bottom layer: it imports nothing of the project, and no torch."""
