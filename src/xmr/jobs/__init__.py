"""Whole jobs behind the CLI: train, evaluate, demo. Application layer: composes the library, holds no model code."""
