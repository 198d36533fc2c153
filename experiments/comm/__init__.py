"""Communication: all-to-all and point-to-point copy times between GPUs."""
