"""Models, compression methods, training loop, metrics and checkpoints.

Importing the package itself is cheap: submodules that need torch or torchrec are imported by name.
"""
