"""Routed-expert compute: where the MoE layers get their experts' outputs from."""
