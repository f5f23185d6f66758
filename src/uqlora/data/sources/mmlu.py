"""MMLU (``mmlu``): 57 subjects, 4 choices A-D.

Local folders ``mmlu/dev`` (285 = 5 per subject, the few-shot examples) / ``val`` (1531) / ``test``
(14042), one headerless csv per subject (question, A, B, C, D, answer letter) -> train / validation /
test; hub ``cais/mmlu`` dev / validation / test. Option ``subjects`` (list of subject names, e.g.
``["high_school_physics"]``; ``None`` = all 57) selects subjects (hub config = subject, or ``all``).
Records carry their ``subject``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uqlora.data.sources.common import (
    MULTIPLE_CHOICE,
    DatasetInfo,
    Entry,
    HubLoad,
    Record,
    Source,
    bad_row,
    choices_list,
    letters,
    mc_record,
    read_csv,
    require_file,
)
from uqlora.errors import DataError

SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_medicine", "college_physics", "computer_security",
    "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip


def subjects_of(options: Mapping[str, Any]) -> list[str]:
    """The selected subjects (all 57 when ``options["subjects"]`` is None), checked."""
    subjects = options.get("subjects")
    if subjects is None:
        return list(SUBJECTS)
    if isinstance(subjects, str):
        subjects = [subjects]
    subjects = [str(s) for s in subjects]
    if not subjects:
        raise DataError(
            "mmlu: empty subjects list; use None for all or choose from: "
            f"{choices_list(SUBJECTS)}"
        )
    for s in subjects:
        if s not in SUBJECTS:
            raise DataError(
                f"mmlu: unknown subject '{s}'; valid subjects: {choices_list(SUBJECTS)}"
            )
    return subjects


def read_local(path: Path, split: str, options, name: str) -> list[Record]:
    suffix = path.name  # the split folder: dev | val | test
    out = []
    for subject in subjects_of(options):
        file = require_file(path / f"{subject}_{suffix}.csv", name)
        for i, row in enumerate(read_csv(file)):
            if len(row) != 6:
                raise bad_row(file, i, f"expected 6 comma-separated fields, got {len(row)}")
            rec = mc_record(f"{subject}-{split}-{i}", row[0], row[1:5], letters(4), row[5])
            rec["subject"] = subject
            out.append(rec)
    return out


def read_hub(load: HubLoad, hub_split: str, split: str, options) -> list[Record]:
    subjects = options.get("subjects")
    configs = ["all"] if subjects is None else subjects_of(options)
    out, counters = [], {}
    for config in configs:
        for row in load(hub_split, config=config):
            subject = str(row.get("subject") or config)
            k = counters.get(subject, 0)
            counters[subject] = k + 1
            choices = list(row["choices"])
            labels = letters(len(choices))
            answer = labels[int(row["answer"])]
            rec = mc_record(f"{subject}-{split}-{k}", row["question"], choices, labels, answer)
            rec["subject"] = subject
            out.append(rec)
    return out


ENTRIES = (
    Entry(
        DatasetInfo(
            name="mmlu",
            task=MULTIPLE_CHOICE,
            num_classes=4,
            label_names=None,
            hub_id="cais/mmlu",
            hub_config="all",
            local_dir="mmlu",
            splits={
                "train": "dev folder (285 = 5 per subject, the few-shot examples); hub dev",
                "validation": "val folder (1531); hub validation",
                "test": "test folder (14042); hub test",
            },
            description="MMLU: 57 subjects, 4 choices A-D. Option subjects=[...] selects "
            "subjects (hub config = subject, or 'all' for all of them).",
        ),
        Source(
            local_files={"train": "dev", "validation": "val", "test": "test"},
            read_local=read_local,
            hub_splits={"train": "dev", "validation": "validation", "test": "test"},
            read_hub=read_hub,
            options=("subjects",),
        ),
    ),
)
