"""Multi-object detection on obfuscated scenes (seed 000 §2.2): scenes, a COCO reader, a CenterNet-style
detector, the per-object SCNL defense (``scnl-detect``), the per-object attack and the training entry."""
