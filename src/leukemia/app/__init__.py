"""A web app (``leukemia app``) for classifying uploaded cell images in a browser.

``analysis`` contains the logic and needs no web framework; ``server`` is the Gradio page and
needs the ``app`` extra (``pip install 'leukemia[app]'``). For research use only. Not for
diagnosis.
"""
