"""kvbench/yaml_dump.py: yaml put together from kept per-key pieces is OmegaConf's whole dump, byte
for byte, for any tree of the values a config holds (nested mappings, lists, long and odd strings)."""
from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench import yaml_dump

keys = st.text(alphabet=string.ascii_letters + string.digits + "_-. :#'\"", min_size=1, max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | \
    st.text(max_size=120) | st.sampled_from(["", "null", "true", "1e-5", "${a.b}", "- x", "a: b", "???", "é ü",
                                             "x" * 100 + " y" * 30])
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                     max_leaves=30)
docs = st.dictionaries(keys, trees, min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(docs, min_size=1, max_size=4))
def test_pieces_are_the_whole_dump(batch):
    yaml_dump._CHECKED.update({None: True, "hydra": True})  # no safety net: every text from pieces
    for doc in batch + batch[::-1]:  # fresh pieces, then kept ones
        assert yaml_dump.to_yaml(doc) == yaml_dump.whole_yaml(doc)
        assert yaml_dump.to_yaml(doc, under="hydra") == yaml_dump.whole_yaml({"hydra": doc})
