"""Jobs that chain the steps (generate, prepare, train, ...) and the ``ctr`` command line."""
