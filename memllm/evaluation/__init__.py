"""Measuring a memory: experiments (arms on shared examples), metrics, statistics and reports."""
