"""The explanation report: `d2prune.explain`'s statistics drawn as figures (`plots`) in HTML (`report`)."""
