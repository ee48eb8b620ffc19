"""dwf: reproducibility package for "Divided We Fall" (soft-gated mixture of adversarially trained experts)."""

__version__ = "0.1.0"
