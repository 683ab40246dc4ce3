"""Each component family's names and knobs, importable without torch.

peft keeps a method's ``config.py`` apart from its ``model.py`` for the same reason: the preset schema,
``fedtui presets`` and the console's first validation need to know which aggregation rules, codecs and
adapter kinds exist and what keys each takes, without loading torch. The components' code imports its
``Options`` from here and registers under the same name; tests check that the two lists agree.
"""
