"""Evaluation: what a trained model reproduces or predicts (memorization, ...).

Entry point: tetra.eval.memorization.measure_memorization.
"""
