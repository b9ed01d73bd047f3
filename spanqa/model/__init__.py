"""The QA model: a `transformers` encoder and an answer head. A leaf: it imports torch and transformers,
nothing of spanqa outside this package (tests/test_layout.py checks), and never sees ranks, env
variables, trackers or answer decoding.

`HEAD_NAMES` is the one list of heads and `CRF_TAGGINGS` the one list of the CRF head's tag schemes
(`spanqa.model.tagging`), the default first (torch-free, so that flag parsing can use them cheaply).
"""

HEAD_NAMES = ("span", "crf")
CRF_TAGGINGS = ("span_end", "span", "bio", "bio_masked")
