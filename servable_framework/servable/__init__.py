"""Declarations: what ``servable_config.py`` builds (pure data, no processes)."""
