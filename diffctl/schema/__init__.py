"""The config schema of every command, checked before any work: `validate(cfg, command)`.

rules.py: the rule types (Int, Float, Choice, ...; every number finite); nodes.py: the walk over a config
and the message shape `<key> must be <what>, got <value>`; keys.py: the table of every key of train,
sample, likelihood, fid-stats, export, train-classifier, inpaint and metrics; autoencoder_keys.py:
train-autoencoder's; lightning_keys.py: the trainer and logger groups.
"""

from diffctl.schema.keys import SCHEMAS, validate, validate_group
from diffctl.schema.nodes import ByTarget, Passthrough, SamplerNode, check_node, fail, unknown_key
from diffctl.schema.rules import AnyOf, Bool, Choice, Float, Int, Numbers, Pattern, Rule, Seq, Text, show

__all__ = ["SCHEMAS", "validate", "validate_group", "ByTarget", "Passthrough", "SamplerNode", "check_node",
           "fail", "unknown_key", "AnyOf", "Bool", "Choice", "Float", "Int", "Numbers",
           "Pattern", "Rule", "Seq", "Text", "show"]  # fmt: skip
