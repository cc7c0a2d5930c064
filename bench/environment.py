"""Where a benchmark result was measured: :mod:`phi3v_core.environment`, re-exported.

It lives in the core so that ``phi3v-plan --validate`` records its machine the same way without importing ``bench``.
"""

from phi3v_core.environment import (
    TRACKED_PACKAGES,
    GpuInfo,
    RunEnvironment,
    capture_environment,
    cpu_hardware_name,
    utc_now,
)

__all__ = ["TRACKED_PACKAGES", "GpuInfo", "RunEnvironment", "capture_environment", "cpu_hardware_name", "utc_now"]
