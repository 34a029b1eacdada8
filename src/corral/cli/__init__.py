"""The ``corral`` command: click commands, TOML config, and the control-socket client.

Nothing here is imported by ``import corral``.
"""
