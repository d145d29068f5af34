"""TEMPORARY old import path of the adapter trainer, which moved to pipelines/training/adapters.py
(training sits above the inference-time adapters package).

This re-export is the one import from studio.adapters up into training, kept only so that
studio/cli/adapt.py's `from studio.adapters.train import config_from, train` keeps working until
that line imports studio.pipelines.training.adapters. Delete this file then; nothing else uses it.
"""

from studio.pipelines.training.adapters import TrainConfig, TrainReport, config_from, train  # noqa: F401
