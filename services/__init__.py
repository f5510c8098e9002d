"""Domain services; each sub-package registers one domain with ``shared.registry``."""
