"""Force-encoding subclasses of fairchem 1.10's backbones (Eq. 5); name them by dotted path."""
