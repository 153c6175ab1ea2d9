"""Shared core of sscd-triton: the facts every part of the project imports."""
