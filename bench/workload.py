"""The benchmark's training data and run settings: :mod:`phi3v_core.training.workload`, re-exported.

They live in the fine-tuning core so that ``phi3v-plan --validate`` times the same steps without importing ``bench``.
"""

from phi3v_core.training.workload import SyntheticWorkload, build_workload, to_train_config

__all__ = ["SyntheticWorkload", "build_workload", "to_train_config"]
