"""Old import paths (memllm 0.1's flat layout) kept for one release, with a DeprecationWarning.

``import memllm.train`` still works and returns :mod:`memllm.training.trainer`; the finder below
maps each old module name to its new home instead of keeping 25 stub files in the tree.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> new module (removed in memllm 0.3)
MOVED = {
    "memllm.backbone": "memllm.core.backbone",
    "memllm.checkpoint": "memllm.core.checkpoint",
    "memllm.config": "memllm.core.config",
    "memllm.generation": "memllm.core.generation",
    "memllm.inject": "memllm.core.inject",
    "memllm.lora": "memllm.core.lora",
    "memllm.segments": "memllm.core.segments",
    "memllm.tiny": "memllm.core.tiny",
    "memllm.prompting": "memllm.data.prompting",
    "memllm.data.commands": "memllm.cli.data",
    "memllm.commands": "memllm.cli.model",
    "memllm.metrics": "memllm.data.babilong_metric",
    "memllm.stats": "memllm.evaluation.stats",
    "memllm.experiment": "memllm.evaluation.experiment",
    "memllm.experiment_config": "memllm.evaluation.experiment_config",
    "memllm.report": "memllm.evaluation.results",
    "memllm.report_plots": "memllm.evaluation.plots",
    "memllm.run_config": "memllm.training.run_config",
    "memllm.train": "memllm.training.trainer",
    "memllm.feature_cache": "memllm.training.feature_cache",
    "memllm.sp_head": "memllm.training.sp_head",
    "memllm.logging_utils": "memllm.training.logging_utils",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.new_name}; the old path goes away in memllm 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:  # already executed under its new name
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
