"""What every method and task shares: config, data, backbone, the masking-method interface and
registry, optimiser, checkpoints, devices, the one training loop and run records.

Nothing here imports ``ropim.suite``, ``downstream`` or a method by name."""
