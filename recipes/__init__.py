"""The shipped recipes: installed as ``online_merging.recipes`` (setup.cfg), where ``online-merging train NAME``
finds ``NAME.yaml``."""
