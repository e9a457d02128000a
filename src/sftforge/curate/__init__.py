"""Seeing and cleaning data before training: statistics and findings, exact and near duplicates, filtering rules."""
