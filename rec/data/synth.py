"""`rec data synth`: a small MiniOneRec-format dataset with structure a tiny model can learn.

What makes it learnable (and what a counting baseline finds, see tests/test_data_synth.py):
- Items fall into categories. The first SID token encodes the category, the next ones a
  sub-group and a position inside it, so SID prefixes carry meaning as in real RQ indices.
- Titles are brand + adjective + the category's noun + a pack size and a unique model code, so
  titles of one category share words; descriptions are upstream-style list strings (some empty).
- Each item has a fixed successor inside its category: the next position of the category, which
  in SID space is one shared rule (same first token, lower codes stepped through fixed tables).
  A user mostly walks that chain (75%), sometimes jumps inside the preferred category (15%),
  rarely anywhere (10%). "Successor of the last item" therefore predicts most next items.

Samples are cut as upstream does (reference §1.3): for every position i >= 1 of a user's sequence,
history = the previous <= 10 items and target = item i; all samples are sorted by the target's
timestamp and split 8:1:1 into train/valid/test. Everything is a function of `seed`.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from rec import storage
from rec.data.dataset import COLUMNS, INDEX_FILE, INFO_FILE, ITEM_FILE, LEVEL_LETTERS, META_FILE
from rec.errors import RecError

CATEGORY_PHRASE = "workshop supplies"
NOUNS = (
    "Drill Bit Set", "Wood Glue", "Masking Tape", "PLA Filament", "Nitrile Gloves", "Temperature Sensor",
    "Bar Clamp", "LED Work Lamp", "Paint Marker", "Lab Notebook", "AA Battery", "Jumper Cable",
    "Safety Goggles", "Hex Key Set", "Cable Ties", "Sanding Discs",
)
BRANDS = ("Acme", "Borealis", "Corvid", "Dynamo", "Elkhorn", "Fulcrum", "Granite", "Helix")
ADJECTIVES = ("Heavy Duty", "Compact", "Professional", "Precision", "Industrial", "Lightweight", "Premium", "Classic")
USES = ("the workshop", "the lab", "home repairs", "the classroom", "field work", "the garage")
HISTORY_WINDOW = 10
P_SUCCESSOR, P_SAME_CATEGORY = 0.75, 0.15


def _codes(rng: np.random.Generator, needed: int) -> np.ndarray:
    """`needed` distinct codes scattered over a range twice as large (SID codes look arbitrary)."""
    return rng.permutation(max(2 * needed, 8))[:needed]


def _item_structure(rng: np.random.Generator, n_items: int, levels: int):
    """Category per item, SID tokens per item, and the per-category item lists."""
    n_categories = int(min(len(NOUNS), max(2, round(math.sqrt(n_items)))))
    # Item ids are unrelated to categories (the model must learn from SIDs/titles, not ids).
    order = rng.permutation(n_items)
    category = np.empty(n_items, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(n_categories)]
    for rank, item_id in enumerate(order):
        category[item_id] = rank % n_categories
        members[rank % n_categories].append(int(item_id))
    # Position j inside a category -> path of local codes below the category level.
    if levels == 3:
        def local_path(j: int) -> tuple[int, ...]:
            return (j // 4, j % 4)
    else:
        def local_path(j: int) -> tuple[int, ...]:
            return (j // 8, (j // 2) % 4, j % 2)
    paths = {}
    for c, items in enumerate(members):
        for j, item_id in enumerate(items):
            paths[item_id] = (c, *local_path(j))
    code_maps = []
    for level in range(levels):
        needed = 1 + max(p[level] for p in paths.values())
        code_maps.append(_codes(rng, needed))
    sid_tokens = [
        [f"<{LEVEL_LETTERS[level]}_{int(code_maps[level][paths[i][level]])}>" for level in range(levels)]
        for i in range(n_items)
    ]
    return category, sid_tokens, members


def _titles_and_descriptions(rng: np.random.Generator, category: np.ndarray):
    titles, descriptions, brands = [], [], []
    for item_id, c in enumerate(category):
        brand = BRANDS[rng.integers(len(BRANDS))]
        adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))]
        pack = int(rng.choice([1, 2, 5, 10, 12, 24, 50]))
        noun = NOUNS[c]
        # The model code makes every title unique (title2sid needs a one-to-one map).
        titles.append(f"{brand} {adjective} {noun}, {pack}-Pack ({brand[:2].upper()}-{1000 + 7 * item_id})")
        brands.append(brand)
        if rng.random() < 0.1:
            descriptions.append("")
        else:
            use = USES[rng.integers(len(USES))]
            paragraphs = [f"A {adjective.lower()} {noun.lower()} by {brand} for {use}.", f"Sold in packs of {pack}."]
            descriptions.append(repr(paragraphs))
    return titles, descriptions, brands


def _user_sequences(rng, n_users: int, members: list[list[int]], successor: dict[int, int], n_items: int):
    """Per user: list of (timestamp, item_id), chronological."""
    sequences = []
    for _ in range(n_users):
        preferred = members[rng.integers(len(members))]
        length = int(rng.integers(4, 13))
        t = float(rng.uniform(0.0, 1000.0))
        seq = [(t, preferred[rng.integers(len(preferred))])]
        for _ in range(length - 1):
            t += float(rng.exponential(60.0))  # users stay active across the time-based splits
            r = rng.random()
            if r < P_SUCCESSOR:
                nxt = successor[seq[-1][1]]
            elif r < P_SUCCESSOR + P_SAME_CATEGORY:
                nxt = preferred[rng.integers(len(preferred))]
            else:
                nxt = int(rng.integers(n_items))
            seq.append((t, nxt))
        sequences.append(seq)
    return sequences


def _csv_text(samples, titles, sids) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for _, user, history, target in samples:
        writer.writerow([
            f"A{user}",
            repr([titles[i] for i in history]),
            titles[target],
            repr(list(history)),
            target,
            repr([sids[i] for i in history]),
            sids[target],
        ])
    return buf.getvalue()


def _is_synthetic(path: str) -> bool:
    """Whether `path` holds a dataset this module wrote (its meta.json says so)."""
    meta = storage.join(path, META_FILE)
    try:
        return storage.exists(meta) and "synthetic" in json.loads(storage.read_text(meta))
    except (ValueError, TypeError, RecError):
        return False


def synthesize(out: str, users: int = 600, items: int = 240, seed: int = 0, levels: int = 3) -> str:
    """Write train/valid/test.csv, info.txt, index.json, item.json and meta.json under `out`."""
    if levels not in (3, 4):
        raise RecError(f"levels must be 3 or 4, got {levels}")
    if items < 8:
        raise RecError(f"items must be at least 8, got {items}")
    if users < 10:
        raise RecError(f"users must be at least 10 (the 8:1:1 split needs samples), got {users}")
    storage.refuse_foreign_output(out, "--out", _is_synthetic, "synthetic dataset")
    rng = np.random.default_rng(seed)
    category, sid_tokens, members = _item_structure(rng, items, levels)
    sids = ["".join(t) for t in sid_tokens]
    titles, descriptions, brands = _titles_and_descriptions(rng, category)
    # The successor of the item at position j of its category is the one at j+1 (cyclically).
    # Positions map to the lower SID levels through per-level code tables shared by every
    # category, so "next item" is one rule in SID space (keep <a>, step the lower codes) rather
    # than a table of arbitrary pairs: a tiny model learns it in a few hundred steps.
    successor: dict[int, int] = {}
    for group in members:
        for a, b in zip(group, group[1:] + group[:1], strict=True):
            successor[a] = b

    samples = []  # (timestamp, user, history ids, target id)
    for user, seq in enumerate(_user_sequences(rng, users, members, successor, items)):
        ids = [item for _, item in seq]
        for i in range(1, len(seq)):
            samples.append((seq[i][0], user, ids[max(0, i - HISTORY_WINDOW) : i], ids[i]))
    samples.sort(key=lambda s: (s[0], s[1]))
    n = len(samples)
    cut_train, cut_valid = int(0.8 * n), int(0.9 * n)
    splits = {"train": samples[:cut_train], "valid": samples[cut_train:cut_valid], "test": samples[cut_valid:]}

    storage.makedirs(out)
    for name, part in splits.items():
        storage.write_text(storage.join(out, f"{name}.csv"), _csv_text(part, titles, sids))
    storage.write_text(storage.join(out, INDEX_FILE), json.dumps({str(i): t for i, t in enumerate(sid_tokens)}))
    item_json = {
        str(i): {"title": titles[i], "description": descriptions[i], "brand": brands[i], "categories": ""}
        for i in range(items)
    }
    storage.write_text(storage.join(out, ITEM_FILE), json.dumps(item_json, indent=2))
    storage.write_text(storage.join(out, INFO_FILE), "".join(f"{sids[i]}\t{titles[i]}\t{i}\n" for i in range(items)))
    meta = {
        "category": CATEGORY_PHRASE,
        "synthetic": {"users": users, "items": items, "seed": seed, "levels": levels, "samples": n},
    }
    storage.write_text(storage.join(out, META_FILE), json.dumps(meta, indent=2) + "\n")
    return out
