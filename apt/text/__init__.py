"""Calibration and evaluation text: offline sources (the standard library's docstrings, manual pages,
Debian documents, licenses, GNU info), files and Hugging Face datasets, split and cut into token windows.

Imports ``apt.errors`` only (and a tokenizer its caller passes in).
"""
