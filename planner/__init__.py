"""phi3v-plan: what fits on a machine, what to run, and how fast it will go, for Phi-3(.5)-vision fine-tuning.

Modules (all importable without torch except :mod:`planner.trace`):

* :mod:`planner.shapes` — model dimensions and parameter counts (``ModelShape``), the processor's token formula;
* :mod:`planner.hardware` — GPU / Azure tables (``planner/data``) and NVML detection (``detect(nvml=...)``);
* :mod:`planner.estimate` — closed-form peak memory per method (``estimate_memory``);
* :mod:`planner.speed` — FLOPs per sample, calibrated MFU, ZeRO-2 communication (``predict_speed``);
* :mod:`planner.calibration` — the recipe's published table as calibration and check (``calibration_report``);
* :mod:`planner.trace` — MemTracker on the full model with fake tensors (``trace_activations``);
* :mod:`planner.recommend` — ``plan(PlanRequest(...)) -> Plan`` (no printing);
* :mod:`planner.cli` — the ``phi3v-plan`` command.

>>> from planner.recommend import PlanRequest, plan
>>> plan(PlanRequest(gpu="A100-80GB", count=8)).recommended
'full'
"""
