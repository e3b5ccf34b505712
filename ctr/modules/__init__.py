"""Small named building blocks of the CTR models: sparse arch, MLP, interactions."""

import torch

META = torch.device("meta")  # embedding tables get memory only when sharded (or built for a plain copy)
