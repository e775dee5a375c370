"""Sample MONAI Label app of monai-skipts (``main.py``); see :mod:`monai_skipts.label`."""
