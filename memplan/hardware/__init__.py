"""Hardware profiles: the accelerators a run can be planned for, shipped as data files."""

from memplan.hardware.profiles import (
    CloudOffer,
    HardwareProfile,
    has_profile,
    list_profiles,
    load_profile,
    profile_files,
)

__all__ = [
    "CloudOffer",
    "HardwareProfile",
    "has_profile",
    "list_profiles",
    "load_profile",
    "profile_files",
]
