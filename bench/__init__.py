"""bench: throughput and memory benchmarks of Phi-3.5-vision fine-tuning (``phi3v-bench``).

Modules: ``config`` (BenchConfig), ``results`` (result schema, storage, environment, pandas loader), ``stats`` and
``compare`` (regression rule), ``report`` (markdown + plots), ``matrix`` (sweeps), ``reference`` (the seed's published
tables), ``runner`` (one configuration), ``cli`` (the command). Nothing is imported here so that ``import bench``
stays cheap.
"""
