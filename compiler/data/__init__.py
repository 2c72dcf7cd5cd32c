"""Data and model generators: the preset models (presets, assets/), the shapes-qa task and the
built-in calibration images."""
