"""Constraint sets: the interface, the safety polytope and baselines."""

from .base import ConstraintSet
from .baselines import LinearConstraint, MLPConstraint
from .polytope import DEFAULT_MARGIN, PolytopeConstraints, PolytopeSettings, assign_facets

__all__ = ["ConstraintSet", "DEFAULT_MARGIN", "LinearConstraint", "MLPConstraint",
           "PolytopeConstraints", "PolytopeSettings", "assign_facets"]
