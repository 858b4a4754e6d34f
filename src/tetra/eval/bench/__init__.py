"""A contamination-free benchmark in LiveBench's categories: questions generated fresh from a seed, each with an
objective scorer (sympy, exact match, F1, edit distance, verifiable constraints, hidden tests run in a subprocess).
"""
