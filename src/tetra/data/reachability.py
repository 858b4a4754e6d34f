"""Graph reachability, a multi-step reasoning task: given the edges of a small random directed graph, is node t
reachable from node s? Deciding it takes as many steps as the path is long, so it is where more iterations of a
recurrent-depth core should help, and the number of hops says how hard a question is.

A problem is "3>7,7>2,5>1:3?2=" (edges a>b, then the question s?t) and the answer "1" (reachable) or "0". Nodes
are the digits 0..N-1. Questions are balanced: half reachable, at a hop count drawn uniformly from 1..max_hops, half
not (their hop count is 0). Shortest paths are found by breadth-first search, so the scorer is exact.

Entry points: ReachabilityTask, shortest_hops(edges, s, t), write_reachability_data(...).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetra.data.arithmetic import SYMBOLS, write_task_data
from tetra.errors import DataError

TASK_KEY = "tetra_reachability"  # in tokenizer_config.json
Edge = tuple[int, int]


def shortest_hops(edges: list[Edge], source: int, target: int) -> int:
    """Edges on the shortest path from source to target (0 when unreachable, or when source is target)."""
    following: dict[int, list[int]] = {}
    for a, b in edges:
        following.setdefault(a, []).append(b)
    seen, queue = {source: 0}, deque([source])
    while queue:
        node = queue.popleft()
        for nxt in following.get(node, []):
            if nxt not in seen:
                seen[nxt] = seen[node] + 1
                if nxt == target:
                    return seen[nxt]
                queue.append(nxt)
    return 0


@dataclass
class ReachabilityTask:
    """Graphs of `nodes` nodes and `edges` edges; reachable questions up to max_hops apart."""

    nodes: int = 10
    edges: int = 12
    max_hops: int = 4

    def check(self) -> None:
        if not 2 <= self.nodes <= 10:
            raise DataError(f"--nodes must be in 2..10: nodes are the digits (got {self.nodes})")
        if not 1 <= self.max_hops < self.nodes or not self.max_hops <= self.edges <= self.nodes * (self.nodes - 1):
            raise DataError(f"--max-hops must be in 1..nodes - 1 and --edges in max_hops..nodes * (nodes - 1) "
                            f"(got max_hops {self.max_hops}, edges {self.edges}, nodes {self.nodes})")

    def prompt(self, edges: list[Edge], source: int, target: int) -> str:
        return ",".join(f"{a}>{b}" for a, b in edges) + f":{source}?{target}="

    def sample(self, rng: random.Random, hops: int) -> tuple[list[Edge], int, int]:
        """A graph and a question whose shortest path has exactly `hops` edges (0: target unreachable)."""
        while True:
            order = rng.sample(range(self.nodes), self.nodes)
            path = order[:max(hops, 1) + 1]
            edges = set(zip(path, path[1:], strict=False)) if hops else set()
            while len(edges) < self.edges:
                a, b = rng.sample(range(self.nodes), 2)
                edges.add((a, b))
            shuffled = sorted(edges)
            rng.shuffle(shuffled)
            source, target = path[0], path[-1] if hops else order[1]
            if shortest_hops(shuffled, source, target) == hops:
                return shuffled, source, target

    def hop_range(self) -> tuple[int, int]:
        """The hop counts a test may ask about (0 = unreachable; a path visits each node once)."""
        return 0, self.nodes - 1

    def problem(self, rng: random.Random, hops: int | None = None) -> tuple[str, str, int]:
        """(prompt, answer, hops); hops None draws a balanced question."""
        if hops is None:
            hops = rng.randint(1, self.max_hops) if rng.random() < 0.5 else 0
        edges, source, target = self.sample(rng, hops)
        return self.prompt(edges, source, target), "1" if hops else "0", hops


def write_reachability_data(out: str | Path, task: ReachabilityTask, examples: int, seed: int = 0,
                            val_fraction: float = 0.01, overwrite: bool = False) -> dict[str, Any]:
    """Prepared data of balanced reachability questions (loss on the answer)."""
    return write_task_data(out, task, TASK_KEY, SYMBOLS, "reachability", examples, seed, val_fraction, overwrite)
