"""soho_core: the SOHO vision-language model, its data and its training, as a library."""

__version__ = "0.1.0"
