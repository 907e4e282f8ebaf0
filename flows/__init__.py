"""Prefect flows composing the vitsem library (see the orchestration issue).

Flows import from ``vitsem``; nothing in ``vitsem``'s core imports from here.
"""
