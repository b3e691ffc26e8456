"""Measurements and reports: what a run achieved (mAP, time), and later size and speed."""
