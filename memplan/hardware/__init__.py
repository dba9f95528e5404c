"""Hardware profiles: the accelerators a run can be planned for, shipped as data files."""

from memplan.hardware.profiles import (
    SOFTWARE_FEATURES,
    CloudOffer,
    HardwareProfile,
    Node,
    SoftwareFeature,
    Support,
    has_profile,
    list_profiles,
    load_profile,
    profile_files,
)

__all__ = [
    "SOFTWARE_FEATURES",
    "CloudOffer",
    "HardwareProfile",
    "Node",
    "SoftwareFeature",
    "Support",
    "has_profile",
    "list_profiles",
    "load_profile",
    "profile_files",
]
