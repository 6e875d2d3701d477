"""The memory mechanism itself: load a backbone, inject memory, run segments, generate, save."""
