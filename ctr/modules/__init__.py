"""Small named building blocks of the CTR models: sparse arch, MLP, interactions."""
