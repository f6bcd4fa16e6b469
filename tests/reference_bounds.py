from ace_lightning.bounds.reference import *  # noqa: F401,F403  (moved into the package: import it from there)
