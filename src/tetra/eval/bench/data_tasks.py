"""Data analysis: reformatting a table (CSV to JSON lines, scored on the parsed rows) and joining two tables
(scored by F1 over the joined rows).

Entry point: TASKS.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re

from tetra.eval.bench.spec import Task

CITIES = ["Lima", "Oslo", "Pune", "Kyiv", "Baku", "Doha", "Riga", "Nice", "Bern", "Cork"]
PRODUCTS = ["lamp", "desk", "chair", "shelf", "mug", "rug", "clock", "vase"]


def _table(rng: random.Random) -> list[dict[str, str]]:
    return [{"city": city, "population": str(rng.randint(10, 999) * 1000), "rank": str(rank)}
            for rank, city in enumerate(rng.sample(CITIES, rng.randint(3, 5)), 1)]


def _csv(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _json_rows(text: str) -> list[dict[str, str]]:
    """Every JSON object in the answer (one per line, or a JSON list), values as strings."""
    body = re.sub(r"```(?:json|jsonl)?", "", text)
    rows = []
    try:
        parsed = json.loads(body.strip())
        candidates = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        candidates = []
        for line in body.splitlines():
            try:
                candidates.append(json.loads(line.strip().rstrip(",")))
            except json.JSONDecodeError:
                continue
    for row in candidates:
        if isinstance(row, dict):
            rows.append({str(k): str(v) for k, v in row.items()})
    return rows


def _f1(given: list[dict[str, str]], truth: list[dict[str, str]]) -> float:
    given_set = {tuple(sorted(row.items())) for row in given}
    truth_set = {tuple(sorted(row.items())) for row in truth}
    common = len(given_set & truth_set)
    if common == 0:
        return 0.0
    precision, recall = common / len(given_set), common / len(truth_set)
    return 2 * precision * recall / (precision + recall)


def reformat(rng: random.Random) -> tuple[str, list[dict[str, str]]]:
    rows = _table(rng)
    return ("Convert this CSV table to JSON lines: one JSON object per row, keys from the header, all values as "
            f"strings. Output only the JSON lines.\n\n{_csv(rows)}", rows)


def join(rng: random.Random) -> tuple[str, list[dict[str, str]]]:
    cities = rng.sample(CITIES, 4)
    stores = [{"store": str(i), "city": city} for i, city in enumerate(cities, 1)]
    sales = [{"store": str(rng.randint(1, 5)), "product": product} for product in rng.sample(PRODUCTS, 5)]
    by_store = {row["store"]: row["city"] for row in stores}
    joined = [{"product": s["product"], "city": by_store[s["store"]]} for s in sales if s["store"] in by_store]
    return ("Join these two tables on the store column (inner join) and output one JSON object per line with the "
            "keys product and city. Output only the JSON lines.\n\nstores.csv:\n" + _csv(stores) +
            "\nsales.csv:\n" + _csv(sales), joined)


TASKS = [Task("table_reformat", "data_analysis", reformat, lambda a, t: float(_json_rows(a) == t)),
         Task("table_join", "data_analysis", join, lambda a, t: _f1(_json_rows(a), t) if t else 1.0)]
