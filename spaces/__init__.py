"""difftune.spaces: one file per search space, each decoding a point to an acceleration config."""
