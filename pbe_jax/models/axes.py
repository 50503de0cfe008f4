"""The one logical-axis vocabulary of pbe_jax.

Every parameter of every model carries a tuple of logical axis names (Flax metadata key
`out_sharding`), one per array dimension, or None for a dimension that is never sharded.
`config.sharding_rules` maps these names to mesh axes (`data`, `fsdp`, `tensor`); see
`pbe_jax.sharding`. Keep this list the single place where names are defined.

| name       | what the dimension holds                                   | example                         |
|------------|------------------------------------------------------------|---------------------------------|
| `embed`    | the model width entering a linear layer / residual stream  | to_q kernel [embed, heads]      |
| `heads`    | attention projection output (heads x head_dim)             | to_q kernel [embed, heads]      |
| `mlp`      | feed-forward hidden width                                  | ff.net.0.proj kernel [embed, mlp] |
| `conv_in`  | input channels of a conv kernel [kh, kw, conv_in, conv_out]|                                 |
| `conv_out` | output channels of a conv kernel                           |                                 |
| `norm`     | scale / bias of a normalisation layer                      | GroupNorm scale [norm]          |
| `vocab`    | rows of an embedding table (positions, tokens)             | position_embedding [vocab, embed] |

Biases take the name of the output dimension of their layer. Kernels of size below
`pbe_jax.sharding.MIN_SHARD_SIZE` are replicated whatever the rules say.
"""

EMBED = "embed"
HEADS = "heads"
MLP = "mlp"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
NORM = "norm"
VOCAB = "vocab"

ALL = (EMBED, HEADS, MLP, CONV_IN, CONV_OUT, NORM, VOCAB)
