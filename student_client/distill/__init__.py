"""The method, one step at a time: SIPS, the KD losses and their feature terms (manifold, attention), `--keep auto`'s
probes, App. E's pipelining, and the optimizer step that puts them together (`MaskedKD` in one's own loop)."""
