"""Bridges to other tools (lm-evaluation-harness): above io, since they load models by path."""
