"""Scaling laws: sweeps, depth studies, Kaplan and Chinchilla fits, forecasts."""
