"""Hardware profiles: the accelerators a run can be planned for, shipped as data files."""

from memplan.hardware.profiles import (
    CloudOffer,
    HardwareProfile,
    list_profiles,
    load_profile,
    profile_files,
)

__all__ = ["CloudOffer", "HardwareProfile", "list_profiles", "load_profile", "profile_files"]
