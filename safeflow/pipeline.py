"""The end-to-end pipeline behind ``safeflow demo``, under one name: a facade without logic.

Each name lives in the module whose job it is, and is documented there:

* :mod:`safeflow.splits` — the prompt splits: the source constants (:data:`~safeflow.splits.OOD_TEST_SOURCES`,
  :data:`~safeflow.splits.FAMILY_OOD_SOURCES`, ...), :class:`~safeflow.splits.Splits`,
  :func:`~safeflow.splits.default_splits`, :func:`~safeflow.splits.own_data_splits`,
  :func:`~safeflow.splits.prompt_splits`, :func:`~safeflow.splits.halve_by_family`;
* :mod:`safeflow.recipes` — the training recipes: :func:`~safeflow.recipes.train_constraints`,
  :func:`~safeflow.recipes.train_refusal_polytope`, :func:`~safeflow.recipes.layer_sweep`, the
  detection table and gate (:func:`~safeflow.recipes.detection_table`,
  :func:`~safeflow.recipes.detection_scores`, :func:`~safeflow.recipes.choose_gate`) and the
  steerer entries (:data:`~safeflow.recipes.DEMO_STEERERS`, :func:`~safeflow.recipes.parse_steerer`,
  :func:`~safeflow.recipes.build_steerers`);
* :mod:`safeflow.demo` — the run itself: :func:`~safeflow.demo.run_demo`, its files
  (:data:`~safeflow.demo.RUN_FILES`, :func:`~safeflow.demo.run_files`,
  :func:`~safeflow.demo.clear_previous_run`) and :func:`~safeflow.demo.environment`.

``from safeflow.pipeline import X`` keeps working for every name listed in ``__all__``; new code
imports from the modules above.
"""

from __future__ import annotations

from .demo import FOREIGN_FILES, RUN_FILES, clear_previous_run, environment, run_demo, run_files
from .recipes import (CONSTRAINT_KINDS, DEMO_DETECTORS, DEMO_STEERERS, GATES, build_steerers, choose_gate,
                      detection_scores, detection_table, layer_sweep, parse_steerer, train_constraints,
                      train_refusal_polytope)
from .splits import (FAMILY_OOD_SOURCES, FAMILY_OOD_TEST_SOURCES, FAMILY_OOD_VALIDATION_SOURCES, HALVED_OOD_SOURCES,
                     OOD_TEST_SOURCES, OOD_VALIDATION_SOURCES, WIDENING_SOURCES, Splits, default_splits,
                     halve_by_family, own_data_splits, prompt_splits)

__all__ = ["CONSTRAINT_KINDS", "DEMO_DETECTORS", "DEMO_STEERERS", "FAMILY_OOD_SOURCES", "FAMILY_OOD_TEST_SOURCES",
           "FAMILY_OOD_VALIDATION_SOURCES", "FOREIGN_FILES", "GATES", "HALVED_OOD_SOURCES", "OOD_TEST_SOURCES",
           "OOD_VALIDATION_SOURCES", "RUN_FILES", "Splits", "WIDENING_SOURCES", "build_steerers", "choose_gate",
           "clear_previous_run", "default_splits", "detection_scores", "detection_table", "environment",
           "halve_by_family", "layer_sweep", "own_data_splits", "parse_steerer", "prompt_splits", "run_demo",
           "run_files", "train_constraints", "train_refusal_polytope"]
