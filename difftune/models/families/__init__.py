"""One adapter per model family. Importing this package registers them, most specific first."""

from difftune.models.families import flux, sd3, transformer2d, unet  # noqa: F401
