"""Imported once by the fork server (:mod:`memplan.web.worker`) before it forks any child:
importing this module imports the planning modules and answers one small question of each
kind, so every child starts with memplan's lazy imports done and its caches (catalog records,
hardware profiles) filled instead of repeating that work per request."""

from __future__ import annotations

from memplan.catalog import catalog_names, catalog_record
from memplan.hardware import list_profiles
from memplan.web.jobs import answer

for _name in catalog_names():
    catalog_record(_name)
list_profiles()
# A QLoRA plan that does not fit (so the fixes are searched too), and a small fit.
answer(
    "plan",
    b'{"model": "tiny-llama", "setup": {"method": "qlora"}, "gpu": "1MiB"}',
    time_limit_s=60.0,
)
answer("fit", b'{"model": "tiny-llama", "gpu": "1GiB", "table": true}', time_limit_s=60.0)
