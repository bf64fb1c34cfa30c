"""Evaluation: video metrics and the ShapeEdit success criterion (`metrics`), the ShapeEdit
benchmark (`shapeedit`) and ISA fidelity on recorded model activations (`activations`)."""
