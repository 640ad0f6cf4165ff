"""Recipes: the papers' official runs as named, versioned sets of parameter values, selected in one word.

A recipe is a YAML file beside this one (``<family>/<name>.yaml``) holding the values it sets (``params``) and,
row by row, the official flag each value comes from (``official``: flag, official value, our param, our value,
source file and line, and a note where ours differs). ``langdml recipe NAME`` writes the values into
params.yaml, so DVC tracks every one of them (``dvc exp show`` lists them, a sweep over a recipe skips the
precompute stages as any other sweep); docs/recipes.md is generated from the same files.
"""
