"""Multi-stage pipelines: stage configs -> stages -> outputs."""
