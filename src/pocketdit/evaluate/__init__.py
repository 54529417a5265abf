"""Evaluation of generated images.

- ``pocketdit.evaluate.shapes_eval``: ShapesEval, a GenEval-style score (single object, two objects,
  counting, colours, position, colour attribution) on images generated from the fixed, versioned ``shapes``
  prompt set, with a programmatic detector (colour segmentation + shape template matching).

Submodules are imported explicitly (``from pocketdit.evaluate.shapes_eval import evaluate``) so that importing
this package stays cheap.
"""
