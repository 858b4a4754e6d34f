"""Scaling-law science: sweeps of model shapes and token budgets, approach-3 fits with bootstrap intervals, and
hyperparameter laws."""
