"""phi3v-plan: what fits on a machine, what to run, and how fast it will go, for Phi-3(.5)-vision fine-tuning.

Modules (all importable without torch except :mod:`planner.trace`):

* :mod:`planner.shapes` — model dimensions and parameter counts (``ModelShape``), the processor's token formula;
* :mod:`planner.hardware` — GPU / Azure tables (``planner/data``) and detection (``detect``, via
  :mod:`phi3v_core.nvml`: ``CUDA_VISIBLE_DEVICES``, MIG, mixed GPUs → the weakest);
* :mod:`planner.estimate` — closed-form peak memory per method (``estimate_memory``; its result types in
  :mod:`planner.memory_types`), host memory of an offloaded optimizer (``host_memory_bytes``);
* :mod:`planner.speed` — step time from first principles: FLOPs, bytes, communication (``predict_speed``);
* :mod:`planner.calibration` — constants fitted on named published rows, judged on the others (``calibration_report``);
* :mod:`planner.validate` — the speed model against real ``phi3v-bench`` steps on this CPU (imports torch);
* :mod:`planner.dataprofile` — token lengths of a jsonl data folder from image headers (``--data``);
* :mod:`planner.trace` — MemTracker on the full model with fake tensors (``trace_activations``);
* :mod:`planner.request` — ``PlanRequest``, ``Hardware``, ``Layout``, ``MethodPlan``, ``Plan`` and the task profiles;
* :mod:`planner.layouts` — every (micro-batch, accumulation, checkpointing, optimizer, offload) of a method, predicted,
  and the fastest that fits;
* :mod:`planner.render` — the launch command and the recipe's reasons (preference and ANLS from ``recipe.json``);
* :mod:`planner.deadline` — Azure summary, the fewest nodes for a deadline, samples of ``--data`` that fit nothing;
* :mod:`planner.recommend` — ``plan(PlanRequest(...)) -> Plan`` (no printing);
* :mod:`planner.cli` — the ``phi3v-plan`` command.

>>> from planner.recommend import PlanRequest, plan
>>> plan(PlanRequest(gpu="A100-80GB", count=8)).recommended
'full'
"""
