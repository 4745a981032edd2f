"""The frontend-neutral core: config, sites, recipe, the int8 formula, observers, calibration policy, report.

It imports no frontend, no pass and no exporter (held by import-linter, see ``.importlinter``).
"""
