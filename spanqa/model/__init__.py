"""The QA model: a `transformers` encoder and an answer head. A leaf: it imports torch and transformers,
nothing of spanqa outside this package (tests/test_layout.py checks), and never sees ranks, env
variables, trackers or answer decoding.

`HEAD_NAMES` is the one list of heads (torch-free, so that flag parsing can use it cheaply).
"""

HEAD_NAMES = ("span", "crf")
