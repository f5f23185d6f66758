"""Dataset registry and adapters: every benchmark as a list of canonical records.

This module is the public face of :mod:`uqlora.data.registry` (the functions) and
:mod:`uqlora.data.sources` (one module per dataset family: local reader, hub mapping and registry
entry; ``custom`` for user files). Each dataset is read from local files under a *data dir*
(``paths.data_dir`` in the config, the ``UQLORA_DATA_DIR`` environment variable, or ``../shared/data``
next to the repository) and, when its local folder is absent, from the Hugging Face hub with
``datasets.load_dataset(hub_id, config, split=...)``. Both paths produce the same record format, so
nothing downstream knows where the data came from. Nothing is cached on disk by this package (the hub
library keeps its own cache).

Record formats (plain dicts)
----------------------------
classification::

    {"id": str, "text": str, "text_pair": str | None, "label": int}

``text_pair`` is only set for sentence-pair tasks (BoolQ: ``text`` = question,
``text_pair`` = passage). Labels are ``0 .. num_classes - 1``; the class names
(``DatasetInfo.label_names``) are the label words used in prompts.

multiple_choice::

    {"id": str, "question": str, "choices": list[str], "label": int,
     "choice_labels": list[str]}

``choice_labels`` are the source's own labels (``"A".."E"`` or ``"1".."4"`` for ARC),
``label`` indexes ``choices``. ARC questions have 3, 4 or 5 choices, so
``DatasetInfo.num_classes`` is the *maximum* number of choices. Optional keys:
``"cloze"`` (``[[context, continuation], ...]``, one pair per choice, for partial scoring;
WinoGrande) and ``"subject"`` (MMLU).

generation::

    {"id": str, "prompt": str, "input": str | None, "response": str, "source": str}

``prompt`` is the instruction (or the math question), ``input`` its optional input, ``response`` the
reference answer and ``source`` where the record comes from (``gsm8k``, ``gpteacher``,
``self_instruct``; ``lima`` from the hub), so a mixture (``instruct_mix``) can be scored per source.
GSM8K records also carry ``"answer_number"``: the final number of the worked answer, a string without
thousands separators. ``DatasetInfo.num_classes`` is 0 and ``label_names`` None for generation.

Split mapping
-------------
Our split names are ``train``, ``validation`` and ``test`` (plus ``test_ood`` for CoLA). Where the
official test set is unlabelled, the official dev set is our test set and there is no validation
split (a caller that needs one carves it from train). Each family module's docstring says which local
file and which hub split feeds each split, and ``DatasetInfo.splits`` documents every split.

Options (``load_split(name, split, data_dir, **options)``): ``mmlu``: ``subjects``; ``agnews``:
``include_title``; ``instruct`` / ``instruct_mix``: ``sources``; ``custom_classification`` / ``custom_multiple_choice``: ``files`` and a column
mapping (:mod:`uqlora.data.sources.custom`).

Every user-facing failure is a one-line :class:`~uqlora.errors.DataError` naming the
bad value and the valid choices.
"""

from __future__ import annotations

from uqlora.data.registry import (
    CHECKSUMS_FILE,
    DATASETS,
    ENV_DATA_DIR,
    available_datasets,
    available_splits,
    default_data_dir,
    get_info,
    load_split,
    verify_files,
)
from uqlora.data.sources.agnews import CLASSES as AGNEWS_CLASSES
from uqlora.data.sources.common import CLASSIFICATION, GENERATION, MULTIPLE_CHOICE, DatasetInfo, Record
from uqlora.data.sources.mmlu import SUBJECTS as MMLU_SUBJECTS
from uqlora.data.sources.newsgroups import GROUPS as NEWSGROUPS
from uqlora.data.sources.sst5 import CLASSES as SST5_CLASSES

__all__ = [
    "AGNEWS_CLASSES",
    "CHECKSUMS_FILE",
    "CLASSIFICATION",
    "DATASETS",
    "ENV_DATA_DIR",
    "GENERATION",
    "MMLU_SUBJECTS",
    "MULTIPLE_CHOICE",
    "NEWSGROUPS",
    "SST5_CLASSES",
    "DatasetInfo",
    "Record",
    "available_datasets",
    "available_splits",
    "default_data_dir",
    "get_info",
    "load_split",
    "verify_files",
]
