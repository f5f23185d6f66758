"""Dataset families: one module per family (local reader, hub mapping and registry entries side by
side), the shared readers and record builders (:mod:`.common`), the hub loader (:mod:`.hub`) and user
files (:mod:`.custom`). :data:`FAMILIES` lists the modules whose ``ENTRIES`` make up the registry."""

from uqlora.data.sources import (
    agnews,
    arc,
    boolq,
    cqa,
    custom,
    glue,
    gsm8k,
    instruct,
    mix,
    mmlu,
    newsgroups,
    obqa,
    sst5,
    tweeteval,
    winogrande,
)

FAMILIES = (
    arc, obqa, winogrande, boolq, cqa, mmlu, glue, sst5, agnews, newsgroups, tweeteval, custom,
    gsm8k, instruct, mix,
)  # fmt: skip
