"""Measuring a memory: experiments (arms on shared examples), metrics, statistics and reports.

``experiment`` runs the arms (config in ``experiment_config``); ``teacher_forcing`` reads
prompts as generation does; ``metrics`` is the registry of metric definitions (each task's
official metric lives beside the task in :mod:`memllm.data`); ``stats`` has intervals and paired
tests. The report is layered without cycles: ``groups`` → ``results`` → ``markdown`` and
``plots`` → ``report`` (:func:`memllm.evaluation.report.write_results`).
"""
