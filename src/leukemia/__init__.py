"""Classify single white blood cell images (C-NMC 2019) as ALL blasts or normal HEM cells.

For research use only. Not for diagnosis.
"""

__version__ = "0.1.0"

# Class index = label: HEM (normal) is 0 and ALL (leukemic blast) is 1, the positive class.
CLASS_NAMES = ("HEM", "ALL")
