"""LIVEditor: in-context video editing with In-context Sparse Attention (ISA)."""

__version__ = "0.1.0"
