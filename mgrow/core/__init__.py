"""What every part of mgrow shares and nothing else: errors, the model description and its parameter names,
growth plans (schema and targets), defaults, memory measurement and the failure hooks of the tests.

Imports no torch at module level (config and plan validation run before torch is loaded), except ``memory``.
"""
