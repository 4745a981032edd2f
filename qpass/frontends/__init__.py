"""Frontends: each loads models in one IR, finds their sites and runs its own pass pipeline
(the :class:`qpass.core.frontend.Frontend` protocol). Frontends do not import each other."""
