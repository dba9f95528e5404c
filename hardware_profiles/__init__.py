"""Hardware profile data files, shipped in the wheel as ``memplan.hardware_profiles``."""
