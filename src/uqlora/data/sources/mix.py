"""``instruct_mix``: math and instructions together (generation), UAL's mixed scenario.

Every split is GSM8K's split followed by ``instruct``'s (each read as its own dataset: local files, else
the hub), so train = 7473 + 1740 = 9213 and test = 1319 + 435 = 1754 with the local copies. Records keep
their ``source`` (``gsm8k``, ``gpteacher``, ``self_instruct``; ``lima`` from the hub) so later code can
set a per-source score. Option ``sources`` (default: all three) selects sources.
"""

from __future__ import annotations

from collections.abc import Callable

from uqlora.data.sources import gsm8k, instruct
from uqlora.data.sources.common import GENERATION, DatasetInfo, Entry, Mixture, Record

SOURCES = (gsm8k.SOURCE, *instruct.SOURCES)


def read(load: Callable[..., list[Record]], split: str, options) -> list[Record]:
    """GSM8K's records of ``split`` (if selected), then the selected instruction sources'."""
    sources = instruct.sources_of(options, SOURCES, "instruct_mix")
    out = load("gsm8k", split) if gsm8k.SOURCE in sources else []
    chosen = [s for s in sources if s in instruct.SOURCES]
    if chosen == list(instruct.SOURCES):  # all of them: also valid for the hub copy
        out += load("instruct", split)
    elif chosen:
        out += load("instruct", split, sources=chosen)
    return out


ENTRIES = (
    Entry(
        DatasetInfo(
            name="instruct_mix",
            task=GENERATION,
            num_classes=0,
            label_names=None,
            hub_id="",
            hub_config=None,
            local_dir="",
            splits={
                "train": "gsm8k train (7473) + instruct train (1740); each part's own local/hub source",
                "test": "gsm8k test (1319) + instruct test (435; the fixed 20% carve)",
            },
            description="Math (GSM8K) and instructions (GPTeacher roleplay, Self-Instruct) mixed; "
            "records carry their source. Option sources selects sources. No validation split.",
        ),
        Mixture(parts=("gsm8k", "instruct"), read=read, options=("sources",)),
    ),
)
